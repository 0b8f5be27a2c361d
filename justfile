# Rumi tasks. `just` comes from PyPI (rust-just): `pip install rust-just`.

# Install the locked dependencies into .venv
bootstrap:
    bash scripts/bootstrap.sh

# The whole test suite (the README's and CI's command)
test *ARGS:
    bash scripts/test.sh {{ARGS}}

# The end-to-end demo
demo:
    bash scripts/demo.sh

# Refresh the repository's own workspace (docker/handlers, scopes, base, config.json and
# ecosystem/default) from config/, the one place to edit: `rumi init` from this tree writes the shipped
# files, stale copies are removed, runtime state (docker/.rumi, grants, ...) is left alone.
# `just sync-workspace --check` changes nothing and exits 1 when docker/ is out of step.
sync-workspace *ARGS:
    .venv/bin/python scripts/sync-workspace.py {{ARGS}}

# Lint and type-check the trusted side and the SDK
lint:
    .venv/bin/ruff check broker pack_runtime tests
    .venv/bin/mypy

# Benchmarks (results go to BENCHMARKS.md by hand, with the command)
bench:
    .venv/bin/python bench/roundtrip.py
    .venv/bin/python bench/pipeline.py
