#!/usr/bin/env bash
# Install Rumi and its locked Python dependencies into .venv (idempotent). Prints what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "bootstrap: Python >= 3.11 is needed (found: $("$PY" --version 2>&1)); install python3.11 and retry" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.rumi-lock-$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing locked Python dependencies (requirements.lock)"
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
  # The distribution was called `rumi` before it became `rumi-broker`: drop that older install of this tree.
  old=$(.venv/bin/pip show rumi 2>/dev/null || true)
  if grep -qx "Editable project location: $PWD" <<<"$old"; then
    echo "bootstrap: removing the old 'rumi' distribution of this tree (now 'rumi-broker')"
    .venv/bin/pip uninstall --quiet --yes rumi
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
  rm -f .venv/.rumi-lock-*
  touch "$stamp"
fi
echo "bootstrap: nats-server $(.venv/bin/nats-server --version 2>/dev/null | head -1)"
