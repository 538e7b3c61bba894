"""Wall time of the quick-start sweep and of an identical rerun (which must skip every point).

    python benchmarks/sweep_cpu.py [extra overrides...]

Runs `python -m lrsweep -m method=svd,lplr rank=32,64` into a fresh results dir and a fresh
cache (cold: the probe and dense metrics are computed once), then the same command again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SWEEP = ["-m", "method=svd,lplr", "rank=32,64"]


def timed(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lrsweep", *args], cwd=REPO, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LRSWEEP_CACHE": f"{tmp}/cache", "WANDB_MODE": "offline"}
        args = [*SWEEP, f"results_dir={tmp}/results", *sys.argv[1:]]
        first, p1 = timed(args, env)
        rerun, p2 = timed(args, env)
    for p in (p1, p2):
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-3000:])
            return 1
    print("\n".join(line for line in p1.stdout.splitlines() if line.startswith("|")))
    print(p1.stdout.strip().splitlines()[-1], "|", p2.stdout.strip().splitlines()[-1])
    print(f"{'run':<28}{'wall s':>8}")
    print(f"{'sweep (4 points, cold cache)':<28}{first:>8.1f}")
    print(f"{'identical rerun (all skip)':<28}{rerun:>8.1f}")
    print(f"rerun / sweep = {rerun / first:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
