"""`python -m broker.cli` = `rumi`."""

from broker.cli import main

main()
