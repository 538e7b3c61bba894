"""``python -m lrsweep``: see lrsweep.cli."""

import sys

try:
    from lrsweep.cli import main
except KeyboardInterrupt:  # Ctrl-C while Hydra and torch load: nothing was started yet
    print("lrsweep: interrupted", file=sys.stderr)
    sys.exit(130)

main()
