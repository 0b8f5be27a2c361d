#!/usr/bin/env bash
# The demo, end to end: installs what it needs, then `rumi demo` (see `rumi demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ -f scripts/ensure-docker.sh ] && [ "${RUMI_DEMO_LOCAL:-0}" != "1" ]; then
  bash scripts/ensure-docker.sh
fi
export PATH="$PWD/.venv/bin:$PATH"
exec rumi demo "$@"
