#!/usr/bin/env bash
# The demo, end to end: installs what it needs, then `rumi demo` (see `rumi demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [[ " $* " != *" --local "* ]]; then
  bash scripts/ensure-docker.sh
fi
export PATH="$PWD/.venv/bin:$PATH"
exec rumi demo "$@"
