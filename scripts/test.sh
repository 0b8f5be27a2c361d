#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ -f scripts/ensure-docker.sh ]; then
  bash scripts/ensure-docker.sh
fi
export PATH="$PWD/.venv/bin:$PATH"
echo "test: running pytest"
exec .venv/bin/python -m pytest "$@"
