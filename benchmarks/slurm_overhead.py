"""Submission overhead of sweeps on the local SLURM cluster (bash launchers/local_slurm.sh up).

    python benchmarks/slurm_overhead.py [--points 64] [--skip-lrsweep]

1. Bare submitit: an array of ``--points`` trivial tasks (a function returning its argument),
   through the SLURM executor and through the local executor: time from submission to all
   results; per-job overhead = wall x parallel slots / points (the work itself is ~0).
2. lrsweep: a ``--points``-point sweep of tiny grid points (MiniLM, one compressed layer, a
   32-text probe; ``seed`` takes ``--points`` values) with ``hydra/launcher=slurm`` and
   ``hydra/launcher=local``: time from command to all rows; against the same points run one
   after another in one process (``lrsweep.job.run``), per-job overhead =
   wall x slots / points - in-process seconds per point.

Both launchers run ``--slots`` jobs at once (default 2: the cores of this machine). The load
average is printed with the figures: other work on the machine inflates all of them.
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
TINY = [r"model.targets=encoder\.layer\.0\.attention\.self\.query", "rank=8", "logger=none",
        "eval.probe_train=32", "eval.probe_test=32", "eval.latency.repeats=1", "eval.latency.warmup=0",
        "eval.latency.shapes=[]", "eval.latency.batch_size=1", "eval.latency.seq_len=8", "progress=false"]


def echo(x: int) -> int:
    return x


def bare(cluster: str, points: int, slots: int, folder: str) -> float:
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    if cluster == "slurm":
        ex.update_parameters(timeout_min=10, slurm_cpus_per_task=1, slurm_mem_gb=1, slurm_array_parallelism=slots)
    else:
        ex.update_parameters(timeout_min=10, cpus_per_task=1)
    t0 = time.perf_counter()
    if cluster == "slurm":
        jobs = ex.map_array(echo, range(points))
    else:  # the local executor has no array parallelism limit: submit in windows of `slots`
        jobs = []
        for i in range(0, points, slots):
            batch = ex.map_array(echo, range(i, min(points, i + slots)))
            [j.result() for j in batch]
            jobs += batch
    assert [j.result() for j in jobs] == list(range(points))
    return time.perf_counter() - t0


def sweep(launcher: str, points: int, slots: int, results: str) -> tuple[float, float]:
    """Wall seconds from command to all rows, and the mean seconds of work inside a job (row.wall_seconds)."""
    par = [f"hydra.launcher.array_parallelism={slots}", "hydra.launcher.mem_gb=2"] if launcher == "slurm" \
        else [f"hydra.launcher.parallelism={slots}"]
    cmd = [sys.executable, "-m", "lrsweep", "-m", f"hydra/launcher={launcher}", "hydra.launcher.cpus_per_task=1",
           *par, f"seed=range(0,{points})", *TINY, f"results_dir={results}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    from lrsweep.row import read_rows

    done = [r for r in read_rows(results) if r.status == "ok"]
    if proc.returncode != 0:  # a failed point still tells the launcher's overhead: report it, go on
        print(f"[bench] {launcher} sweep: rc={proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}\n"
              f"{proc.stderr[-2000:]}", flush=True)
    if not done:
        raise SystemExit(f"{launcher} sweep wrote no ok row:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, sum(r.wall_seconds for r in done) / len(done)


def in_process(points: int, results: str) -> float:
    """Seconds per point of job.run in this process (after one warm-up point)."""
    from hydra import compose, initialize_config_dir

    import hydra_plugins.lrsweep_launcher.launcher  # noqa: F401
    from lrsweep import job

    os.environ["LRSWEEP_THREADS"] = "1"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfgs = [compose("config", overrides=[*TINY, f"seed={1000 + i}", f"results_dir={results}", "threads=1"])
                for i in range(points + 1)]
    job.run(cfgs[0])
    t0 = time.perf_counter()
    for cfg in cfgs[1:]:
        assert job.run(cfg).status == "ok"
    return (time.perf_counter() - t0) / points


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--in-process-points", type=int, default=8)
    ap.add_argument("--skip-lrsweep", action="store_true")
    ap.add_argument("--launchers", default="slurm,local", help="lrsweep launchers to time (comma-separated)")
    args = ap.parse_args()
    if not os.environ.get("SLURM_CONF"):
        raise SystemExit("SLURM_CONF is unset: bash launchers/local_slurm.sh up")
    os.environ.setdefault("LRSWEEP_CACHE", str(Path(tempfile.gettempdir()) / "lrsweep-bench-cache"))
    n, s = args.points, args.slots
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for cluster in ("slurm", "local"):
            wall = bare(cluster, n, s, f"{tmp}/bare-{cluster}/%j")
            rows.append((f"bare submitit, {cluster}", wall, wall * s / n, None))
            print(rows[-1], flush=True)
        if not args.skip_lrsweep:
            per_point = in_process(args.in_process_points, f"{tmp}/inproc")
            rows.append(("lrsweep in one process", per_point * n / s, per_point, 0.0))
            print(rows[-1], flush=True)
            for launcher in args.launchers.split(","):
                wall, work = sweep(launcher, n, s, f"{tmp}/sweep-{launcher}")
                rows.append((f"lrsweep hydra/launcher={launcher}", wall, wall * s / n, wall * s / n - per_point))
                print(rows[-1], f"work inside a job {work:.2f} s", flush=True)
                notes.append(f"{launcher}: {work:.2f} s of a job's {wall * s / n:.2f} slot-s is the grid point's own "
                             f"work (row.wall_seconds); the rest is process start, imports, config, model load")
    print(f"\n{n} points, {s} at a time; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'what':<34}{'wall s':>9}{'slot-s/job':>12}{'overhead s/job':>16}")
    for what, wall, per_job, over in rows:
        print(f"{what:<34}{wall:>9.1f}{per_job:>12.2f}{'' if over is None else f'{over:.2f}':>16}")
    print("(in one process: wall = per-point time x points / slots, the ideal with no launcher)")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
