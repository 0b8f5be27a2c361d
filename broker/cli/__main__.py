"""`python -m broker.cli` = `rumi`."""

from . import main

main()
