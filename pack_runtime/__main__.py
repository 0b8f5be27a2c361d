"""`python -m pack_runtime [ENTRYPOINT]`: run a Pack's entrypoint file (default main.py) as __main__."""

from __future__ import annotations

import runpy
import sys

if __name__ == "__main__":
    entry = sys.argv[1] if len(sys.argv) > 1 else "main.py"
    sys.argv = [entry]
    runpy.run_path(entry, run_name="__main__")
