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

# Lint and type-check the trusted side and the SDK
lint:
    .venv/bin/ruff check broker pack_runtime tests
    .venv/bin/mypy

# Benchmarks (results go to BENCHMARKS.md by hand, with the command)
bench:
    .venv/bin/python bench/roundtrip.py
