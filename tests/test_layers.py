"""The layer rule of broker/ (see docs/architecture.md), checked on the tree and on a made-up one."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests._layers import LAYERS, check_tree, imports_of, unit_of

REPO = Path(__file__).resolve().parent.parent


def test_the_tree_follows_the_layer_rule() -> None:
    violations = check_tree(REPO, handler_dirs=(REPO / "config" / "handlers",))
    assert not violations, "\n".join(str(v) for v in violations)


def test_every_broker_module_belongs_to_a_layer() -> None:
    for path in sorted((REPO / "broker").rglob("*.py")):
        if "_defaults" in path.parts:
            continue
        dotted = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        unit = unit_of(dotted)
        assert unit is not None and unit in LAYERS, f"{path}: no layer"
        # Only the package's own __init__ sits directly in `broker`: every module has a home.
        assert unit != "broker" or dotted == "broker", f"{path}: a module outside every subpackage"


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_checker_reports_module_and_function_level_violations_with_file_and_line(tmp_path: Path) -> None:
    for pkg in ("broker", "broker/core", "broker/policy", "broker/audit", "broker/cli", "pack_runtime"):
        _write(tmp_path, f"{pkg}/__init__.py", '"""x"""\n')
    _write(tmp_path, "broker/core/ids.py", "X = 1\n")
    _write(tmp_path, "broker/cli/app.py", "from broker.core.ids import X\n")
    bad = _write(
        tmp_path,
        "broker/policy/grants.py",
        """\
        import os
        from broker.core.ids import X
        from broker.cli.app import X as Y


        def later():
            from broker.audit import trail
            return trail
        """,
    )
    _write(tmp_path, "broker/audit/trail.py", "Z = 2\n")
    violations = check_tree(tmp_path)
    where = {(v.path, v.line) for v in violations}
    assert (bad, 3) in where, violations  # module level: policy → cli (upward, and the CLI)
    assert (bad, 7) in where, violations  # function level: policy → audit (a sibling)
    assert len(violations) == 2, violations
    text = "\n".join(str(v) for v in violations)
    assert f"{bad}:3:" in text and f"{bad}:7:" in text


def test_checker_reports_cycles_and_sdk_imports(tmp_path: Path) -> None:
    for pkg in ("broker", "broker/core", "pack_runtime"):
        _write(tmp_path, f"{pkg}/__init__.py", '"""x"""\n')
    a = _write(tmp_path, "broker/core/a.py", "from broker.core import b\n")
    _write(tmp_path, "broker/core/b.py", "def f():\n    from broker.core.a import g\n")
    sdk = _write(tmp_path, "pack_runtime/x.py", "import broker.core.a\n")
    handlers = tmp_path / "handlers"
    handler = _write(tmp_path, "handlers/h.py", "from broker.core.a import g\nfrom broker.handler_api import C\n")
    violations = check_tree(tmp_path, handler_dirs=(handlers,))
    messages = [str(v) for v in violations]
    assert any(str(a) + ":1:" in m and "cycle" in m for m in messages), messages
    assert any(str(sdk) + ":1:" in m and "pack_runtime" in m for m in messages), messages
    assert any(str(handler) + ":1:" in m for m in messages), messages
    assert not any(str(handler) + ":2:" in m for m in messages), messages


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    _write(tmp_path, "broker/__init__.py", "")
    _write(tmp_path, "broker/policy/__init__.py", "")
    _write(tmp_path, "broker/policy/sub.py", "")
    path = _write(tmp_path, "broker/policy/grants.py", "from . import sub\nfrom ..core import ids\n")
    targets = [imp.target for imp in imports_of(tmp_path, path)]
    assert targets == ["broker.policy.sub", "broker.core"]
