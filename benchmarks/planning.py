"""Planning cost: a dry run's wall time, CPU time and peak memory by grid size, and over a results dir
of existing rows; with ``--against``, the same dry runs of another checkout side by side.

    python benchmarks/planning.py [--points 1000,10000] [--values] [--rows 5000 --row-points 100]
                                  [--against <another lrsweep checkout>]

Each figure is one ``python -m lrsweep -m seed=range(0,N) dry_run=true results_dir=<tmp>`` process
(a seed sweep: every point valid, each its own run_id), its wall time, its CPU time and its peak
resident memory (getrusage of the child). ``--values``: instead, the 9,216 points of
``rank=range(1,385) bits=2,3,4,5,6,7,8,16 method=svd,lplr,rsvd``, every one a different config (no
two share a validation). With ``--rows R``: R ok rows are written into the results dir first and a
``--row-points``-point dry run reads them (the estimate of each point's time comes from them); the
time they add is against the same dry run before they were written. ``--against DIR``: each dry run
also runs from DIR (its lrsweep imported first: the process starts there), alternating, and the
ratios of CPU time are printed (CPU time, since wall time follows the machine's load).
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
VALUES = ["rank=range(1,385)", "bits=2,3,4,5,6,7,8,16", "method=svd,lplr,rsvd"]


def dry_run(grid: list[str], results_dir: str, repo: Path = REPO) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak MB) of one dry run of ``grid`` in its own process started in ``repo``."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "import resource, runpy, sys; sys.argv = ['lrsweep', *sys.argv[1:]]\n"
           "try:\n    runpy.run_module('lrsweep', run_name='__main__')\nfinally:\n"
           "    u = resource.getrusage(resource.RUSAGE_SELF)\n"
           "    sys.stderr.write(f\"\\nUSAGE {u.ru_maxrss} {u.ru_utime + u.ru_stime}\\n\")",
           "-m", *grid, "dry_run=true", f"results_dir={results_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or "nothing was launched" not in proc.stdout:
        sys.exit(f"dry run of {grid} in {repo} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    _, peak, cpu = next(line.split() for line in proc.stderr.splitlines() if line.startswith("USAGE"))
    return seconds, float(cpu), int(peak) / 1024


def write_rows(results_dir: str, n: int) -> None:
    from lrsweep.row import ResultRow, now, write_row

    for i in range(n):
        write_row(results_dir, ResultRow(run_id=f"bench{i:06d}", status="ok", model="minilm", method="svd",
                                         rank=1 + i % 384, wall_seconds=1.0 + i % 7, finished_at=now()))


def row(label: str, rows: int, fig: tuple[float, float, float], against: tuple[float, float, float] | None) -> str:
    line = f"{label:>8} {rows:>6} {fig[0]:>9.1f} {fig[1]:>8.1f} {fig[2]:>9.0f}"
    if against is not None:
        line += f"   against: {against[0]:>6.1f} s, {against[1]:>6.1f} CPU s, {against[2]:>5.0f} MB; " \
                f"CPU ratio {fig[1] / against[1]:.2f}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="1000,10000", help="seed-grid sizes, comma-separated")
    ap.add_argument("--values", action="store_true", help="also the 9,216-point grid of distinct configs")
    ap.add_argument("--rows", type=int, default=0, help="existing rows to plan over (0: none)")
    ap.add_argument("--row-points", type=int, default=100, help="points of the dry run over --rows rows")
    ap.add_argument("--against", type=Path, help="another lrsweep checkout to run the same dry runs with")
    args = ap.parse_args()
    grids = [(str(n), [f"seed=range(0,{n})"]) for n in (int(x) for x in args.points.split(",") if x)]
    if args.values:
        grids.append(("9216 v", VALUES))
    print(f"{'points':>8} {'rows':>6} {'seconds':>9} {'CPU s':>8} {'peak MB':>9}")
    for label, grid in grids:
        with tempfile.TemporaryDirectory() as tmp:
            fig = dry_run(grid, f"{tmp}/results")
            against = dry_run(grid, f"{tmp}/results", args.against) if args.against else None
        print(row(label, 0, fig, against), flush=True)
    if args.rows:
        grid = [f"seed=range(0,{args.row_points})"]
        with tempfile.TemporaryDirectory() as tmp:
            without = dry_run(grid, f"{tmp}/results")
            write_rows(f"{tmp}/results", args.rows)
            fig = dry_run(grid, f"{tmp}/results")
        print(row(str(args.row_points), args.rows, fig, None) + f"   (the rows add {fig[0] - without[0]:.1f} s "
              "to the same dry run without them)", flush=True)


if __name__ == "__main__":
    main()
