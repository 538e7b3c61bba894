"""Planning cost: a dry run's wall time and peak memory by grid size, and over a results dir of existing rows.

    python benchmarks/planning.py [--points 100,1000,10000] [--rows 5000 --row-points 100]

Each figure is one ``python -m lrsweep -m seed=range(0,N) dry_run=true results_dir=<tmp>`` process
(a seed sweep: every point valid, each its own run_id), its wall time and its peak resident memory
(getrusage of the child). With ``--rows R``: R ok rows are written into the results dir first and a
``--row-points``-point dry run reads them (the estimate of each point's time comes from them); the
time they add is against the same dry run before they were written.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def dry_run(points: int, results_dir: str) -> tuple[float, float]:
    """(seconds, peak MB) of one dry run of ``points`` points in its own process."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "import resource, runpy, sys; sys.argv = ['lrsweep', *sys.argv[1:]]\n"
           "try:\n    runpy.run_module('lrsweep', run_name='__main__')\nfinally:\n"
           "    sys.stderr.write(f\"\\nPEAK_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n\")",
           "-m", f"seed=range(0,{points})", "dry_run=true", f"results_dir={results_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or "nothing was launched" not in proc.stdout:
        sys.exit(f"dry run of {points} points failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_KB"))
    return seconds, peak / 1024


def write_rows(results_dir: str, n: int) -> None:
    from lrsweep.row import ResultRow, now, write_row

    for i in range(n):
        write_row(results_dir, ResultRow(run_id=f"bench{i:06d}", status="ok", model="minilm", method="svd",
                                         rank=1 + i % 384, wall_seconds=1.0 + i % 7, finished_at=now()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="100,1000,10000", help="grid sizes, comma-separated")
    ap.add_argument("--rows", type=int, default=0, help="existing rows to plan over (0: none)")
    ap.add_argument("--row-points", type=int, default=100, help="points of the dry run over --rows rows")
    args = ap.parse_args()
    print(f"{'points':>8} {'rows':>6} {'seconds':>9} {'peak MB':>9}")
    for n in (int(x) for x in args.points.split(",") if x):
        with tempfile.TemporaryDirectory() as tmp:
            seconds, mb = dry_run(n, f"{tmp}/results")
        print(f"{n:>8} {0:>6} {seconds:>9.1f} {mb:>9.0f}", flush=True)
    if args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            without, _ = dry_run(args.row_points, f"{tmp}/results")
            write_rows(f"{tmp}/results", args.rows)
            seconds, mb = dry_run(args.row_points, f"{tmp}/results")
        print(f"{args.row_points:>8} {args.rows:>6} {seconds:>9.1f} {mb:>9.0f}   "
              f"(the rows add {seconds - without:.1f} s to the same dry run without them)", flush=True)


if __name__ == "__main__":
    main()
