"""Run ``python -m lrsweep`` as a user would, with tiny grid points and faultlib importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent

# one block of MiniLM, a small probe, two latency repeats, no W&B: a grid point in seconds
TINY = ["logger=none", "progress=false", "eval.probe_train=64", "eval.probe_test=64",
        "eval.latency.repeats=2", "eval.latency.warmup=0", "eval.latency.batch_size=2",
        "eval.latency.seq_len=16", r"model.targets=encoder\.layer\.0\.attention\.self\.query"]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out.update(extra)
    return out


def lrsweep(*args: str, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrsweep", *args], cwd=REPO, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)
