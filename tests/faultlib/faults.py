"""Methods plugged in with ``method._target_=faultlib.faults.<name>`` to inject faults.

``faulty_svd`` is truncated SVD, except at the ranks named by ``raise_at`` / ``kill_at`` /
``sleep_at``: there it raises, SIGKILLs its own process or sleeps (until the launcher's
time-out). Each fault fires once per ``state_dir`` (a marker file is left), so a rerun of the
same sweep succeeds; every call is appended to ``<state_dir>/calls.log``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lrsweep.methods.svd import svd


def _fire_once(state_dir: str, name: str) -> bool:
    marker = Path(state_dir) / f"fired-{name}"
    try:
        marker.open("x").close()
        return True
    except FileExistsError:
        return False


def faulty_svd(W, *, rank, bits=16, seed=0, stats=None, state_dir: str, raise_at: int = -1,
               kill_at: int = -1, sleep_at: int = -1, **options):
    with open(Path(state_dir) / "calls.log", "a") as f:
        f.write(f"{rank} {os.getpid()}\n")
    if rank == raise_at and _fire_once(state_dir, f"raise-{rank}"):
        raise RuntimeError(f"injected fault: exception at rank {rank}")
    if rank == kill_at and _fire_once(state_dir, f"kill-{rank}"):
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == sleep_at and _fire_once(state_dir, f"sleep-{rank}"):
        time.sleep(3600)
    return svd(W, rank=rank, bits=bits, seed=seed, **options)


def needs_xtx(W, *, rank, bits=16, seed=0, stats=None, **options):
    """A calibration-based method: it needs the inputs' Gram matrix (``stats.xtx``)."""
    if stats is None or stats.xtx is None:
        raise RuntimeError("needs_xtx ran without calibration statistics")
    return svd(W, rank=rank, bits=bits, seed=seed, **options)


needs_xtx.needs = ("xtx",)


def checkpointed_svd(W, *, rank, bits=16, seed=0, stats=None, state_dir: str, wait_at: int = -1, **options):
    """Waits (once per ``state_dir``; at rank ``wait_at`` when given) to be preempted: writes
    ``<state_dir>/waiting`` and sleeps. Every call is appended to ``<state_dir>/calls.log``."""
    with open(Path(state_dir) / "calls.log", "a") as f:
        f.write(f"{rank} {os.getpid()}\n")
    if wait_at in (-1, rank) and _fire_once(state_dir, "preempt"):
        (Path(state_dir) / "waiting").write_text(str(os.getpid()))
        time.sleep(600)
    return svd(W, rank=rank, bits=bits, seed=seed, **options)
