"""``python -m lrsweep`` (lrsweep.cli). Python's garbage collector is off while the CLI's modules
import (torch & co.: ~190,000 objects that live as long as the process; ~0.4 s of ~3.8 s on a
2-core VM), then they are frozen out of its passes and it is back on, as in a job (lrsweep.jobmain)."""

from lrsweep import jobmain

jobmain.pause()
from lrsweep.cli import main  # noqa: E402

jobmain.startup_done()
main()
