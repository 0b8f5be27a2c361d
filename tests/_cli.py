"""How tests run the `rumi` command: this checkout's CLI in this interpreter, Ctrl-C as in a terminal.

A test run started as a background job of a non-interactive shell (`bash scripts/test.sh &`) has
SIGINT ignored, as POSIX asks for asynchronous commands, and every child inherits that: a test that
presses Ctrl-C on `rumi` would wait in vain. The command therefore puts SIGINT back to what an
interactive terminal gives it before the CLI starts.
"""

from __future__ import annotations

import sys

RUMI = [
    sys.executable,
    "-c",
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'rumi'; "
    "from broker.cli import main; main()",
]
