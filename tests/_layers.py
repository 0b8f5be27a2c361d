"""The import rule of `broker/`, read from the source with `ast` (nothing is imported or run).

Layers import only downward::

    cli → admin → {service, containers, handler_api} → {policy, audit, bus, backends} → core → pack_runtime

- Siblings on one layer do not import each other, except the pairs named in ALLOWED_SIBLINGS.
- Nothing imports `broker.cli` but the CLI itself.
- `pack_runtime` imports nothing of `broker`.
- Handler files (`config/handlers/*.py`) import only `broker.handler_api` of the broker.
- No import cycle between modules, anywhere.

Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Top-level unit → layer (higher imports lower). A unit is a subpackage of broker, or a module.
LAYERS: dict[str, int] = {
    "broker.cli": 5,
    "broker.admin": 4,
    "broker.service": 3,
    "broker.containers": 3,
    "broker.handler_api": 3,
    "broker.policy": 2,
    "broker.audit": 2,
    "broker.bus": 2,
    "broker.backends": 2,
    "broker.core": 1,
    "broker": 1,  # the package's own __init__: imports nothing
    "pack_runtime": 0,
}
# (importer unit, imported unit) pairs on one layer that are allowed.
ALLOWED_SIBLINGS: frozenset[tuple[str, str]] = frozenset()
HANDLER_API = "broker.handler_api"


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it stands."""

    importer: str  # dotted module
    target: str  # dotted module (resolved to a module file where one exists)
    path: Path
    line: int


@dataclass(frozen=True)
class Violation:
    """An import that breaks the rule, with where it stands."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def module_name(root: Path, path: Path) -> str:
    """Dotted name of the module in `path` under the source root `root`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(root: Path, path: Path, module: str | None = None) -> Iterator[Import]:
    """Every import in one file (all nesting levels), resolved to dotted module names."""
    module = module or module_name(root, path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package_of(module, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                target = candidate if _is_module(root, candidate) else source
                yield Import(module, target, path, node.lineno)


def unit_of(dotted: str) -> str | None:
    """The layer unit a module belongs to (the longest LAYERS key that prefixes it), or None."""
    best: str | None = None
    for unit in LAYERS:
        if (dotted == unit or dotted.startswith(unit + ".")) and (best is None or len(unit) > len(best)):
            best = unit
    return best


def _rule_violation(imp: Import) -> str | None:
    src, dst = unit_of(imp.importer), unit_of(imp.target)
    if src is None or dst is None or src == dst:
        return None
    if src == "pack_runtime":
        return f"pack_runtime must not import the broker ({imp.target})"
    if dst == "broker.cli":
        return f"nothing imports the CLI ({imp.importer} imports {imp.target})"
    if dst == "broker" and imp.target == "broker":
        return None  # the package itself: only its docstring
    if LAYERS[dst] > LAYERS[src]:
        return f"{src} (layer {LAYERS[src]}) imports upward: {imp.target} (layer {LAYERS[dst]})"
    if LAYERS[dst] == LAYERS[src] and (src, dst) not in ALLOWED_SIBLINGS:
        return f"siblings on layer {LAYERS[src]} do not import each other: {src} imports {imp.target}"
    return None


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """Each strongly connected component with more than one module, as the imports that close it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        # Iterative Tarjan: module graphs are small, but recursion limits are not worth a risk.
        work = [(v, iter(sorted(edges.get(v, {}))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, {})))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                if len(component) > 1 or node in edges.get(node, {}):
                    found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    result = []
    for component in found:
        members = set(component)
        result.append([imp for m in component for t, imp in sorted(edges.get(m, {}).items()) if t in members])
    return result


def check_tree(root: Path, handler_dirs: tuple[Path, ...] = ()) -> list[Violation]:
    """Every violation of the import rule under `root` (which holds `broker/` and `pack_runtime/`)."""
    violations: list[Violation] = []
    edges: dict[str, dict[str, Import]] = {}
    for top in ("broker", "pack_runtime"):
        for path in sorted((root / top).rglob("*.py")):
            if "_defaults" in path.relative_to(root).parts:
                continue  # package data (handler files), checked below
            for imp in imports_of(root, path):
                problem = _rule_violation(imp)
                if problem:
                    violations.append(Violation(path, imp.line, problem))
                if unit_of(imp.target) and imp.target != imp.importer and imp.target != "broker":
                    edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    for cycle in _cycles(edges):
        ring = " → ".join(imp.importer for imp in cycle)
        for imp in cycle:
            violations.append(Violation(imp.path, imp.line, f"import cycle ({ring}): imports {imp.target}"))
    for directory in handler_dirs:
        for path in sorted(directory.glob("*.py")):
            for imp in imports_of(root, path, module=f"handler.{path.stem}"):
                unit = unit_of(imp.target)
                if unit is not None and unit != "pack_runtime" and imp.target != HANDLER_API:
                    violations.append(
                        Violation(path, imp.line, f"a handler imports only {HANDLER_API} (not {imp.target})")
                    )
    return sorted(set(violations), key=lambda v: (str(v.path), v.line, v.message))
