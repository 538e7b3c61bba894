"""``python -m lrsweep``: see lrsweep.cli."""

from lrsweep.cli import main

main()
