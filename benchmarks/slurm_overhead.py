"""Submission overhead of sweeps on the local SLURM cluster (bash launchers/local_slurm.sh up).

    python benchmarks/slurm_overhead.py [--points 64] [--skip-lrsweep] [--points-per-job 1,auto] [--quickstart]

1. Bare submitit: an array of ``--points`` trivial tasks (a function returning its argument),
   through the SLURM executor and through the local executor: time from submission to all
   results; per-job overhead = wall x parallel slots / points (the work itself is ~0).
2. lrsweep: a ``--points``-point sweep of tiny grid points (MiniLM, one compressed layer, a
   32-text probe; ``rank`` takes ``--points`` values, so the points share the dense model and
   ``points_per_job=auto`` can pack them: a ``seed`` sweep would not pack, seed is part of
   lrsweep.job.dense_key) with ``hydra/launcher=slurm`` and
   ``hydra/launcher=local``: time from command to all rows; against the same points run one
   after another in one process (``lrsweep.job.run``), per-job overhead =
   wall x slots / points - in-process seconds per point. Each launcher runs once per
   ``--points-per-job`` value (1: a job per point; auto: the points in as many jobs as slots).
3. ``--quickstart``: the README's 4-point sweep (``python -m lrsweep -m method=svd,lplr
   rank=32,64``, local launcher with its defaults) into a fresh results dir and a fresh cache.

The goals are printed side by side at the end: the packed SLURM sweep against the in-process
time (goal <= 1.5x) and the quick start's wall time (goal <= 30 s on 2 cores).

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
TINY = [r"model.targets=encoder\.layer\.0\.attention\.self\.query", "logger=none",
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


def sweep(launcher: str, points: int, slots: int, results: str, per_job: str) -> tuple[float, float]:
    """Wall seconds from command to all rows, and the mean seconds of work inside a job (row.wall_seconds)."""
    par = [f"hydra.launcher.array_parallelism={slots}", "hydra.launcher.mem_gb=2"] if launcher == "slurm" \
        else [f"hydra.launcher.parallelism={slots}"]
    cmd = [sys.executable, "-m", "lrsweep", "-m", f"hydra/launcher={launcher}", "hydra.launcher.cpus_per_task=1",
           *par, f"hydra.launcher.points_per_job={per_job}", f"rank=range(1,{points + 1})", *TINY,
           f"results_dir={results}"]
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

    from lrsweep import job

    os.environ["LRSWEEP_THREADS"] = "1"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfgs = [compose("config", overrides=[*TINY, f"rank={i + 1}", f"results_dir={results}", "threads=1"])
                for i in range(points + 1)]
    job.run(cfgs[0])
    t0 = time.perf_counter()
    for cfg in cfgs[1:]:
        assert job.run(cfg).status == "ok"
    return (time.perf_counter() - t0) / points


def quickstart(tmp: str) -> float:
    """Wall seconds of the README's quick-start sweep, fresh results dir and cache."""
    env = {**os.environ, "LRSWEEP_CACHE": f"{tmp}/qs-cache", "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lrsweep", "-m", "method=svd,lplr", "rank=32,64",
                           f"results_dir={tmp}/qs-results"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"quick start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--in-process-points", type=int, default=8)
    ap.add_argument("--skip-lrsweep", action="store_true")
    ap.add_argument("--launchers", default="slurm,local", help="lrsweep launchers to time (comma-separated)")
    ap.add_argument("--points-per-job", default="1,auto", help="hydra.launcher.points_per_job values to time")
    ap.add_argument("--skip-bare", action="store_true")
    ap.add_argument("--quickstart", action="store_true", help="also time the README quick-start sweep")
    args = ap.parse_args()
    if not os.environ.get("SLURM_CONF"):
        raise SystemExit("SLURM_CONF is unset: bash launchers/local_slurm.sh up")
    os.environ.setdefault("LRSWEEP_CACHE", str(Path(tempfile.gettempdir()) / "lrsweep-bench-cache"))
    n, s = args.points, args.slots
    rows, notes, goals = [], [], []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for cluster in () if args.skip_bare else ("slurm", "local"):
            wall = bare(cluster, n, s, f"{tmp}/bare-{cluster}/%j")
            rows.append((f"bare submitit, {cluster}", wall, wall * s / n, None))
            print(rows[-1], flush=True)
        if not args.skip_lrsweep:
            per_point = in_process(args.in_process_points, f"{tmp}/inproc")
            rows.append(("lrsweep in one process", per_point * n / s, per_point, 0.0))
            print(rows[-1], flush=True)
            for launcher in args.launchers.split(","):
                for per_job in args.points_per_job.split(","):
                    wall, work = sweep(launcher, n, s, f"{tmp}/sweep-{launcher}-{per_job}", per_job)
                    rows.append((f"lrsweep {launcher}, points_per_job={per_job}", wall, wall * s / n,
                                 wall * s / n - per_point))
                    print(rows[-1], f"work inside a job {work:.2f} s", flush=True)
                    notes.append(f"{launcher}, points_per_job={per_job}: {work:.2f} s of a point's {wall * s / n:.2f} "
                                 f"slot-s is its own work (row.wall_seconds); the rest is process start, imports, "
                                 f"config, model load")
                    goals.append((f"{launcher} sweep / in-process, points_per_job={per_job}",
                                  f"{wall / (per_point * n / s):.2f}x", "<= 1.5x" if launcher == "slurm" else ""))
        if args.quickstart:
            wall = quickstart(tmp)
            goals.append(("README quick start, 4 points, cold cache", f"{wall:.1f} s", "<= 30 s"))
    print(f"\n{n} points, {s} at a time; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"on {os.cpu_count()} cores")
    print(f"{'what':<34}{'wall s':>9}{'slot-s/job':>12}{'overhead s/job':>16}")
    for what, wall, per_job, over in rows:
        print(f"{what:<34}{wall:>9.1f}{per_job:>12.2f}{'' if over is None else f'{over:.2f}':>16}")
    print("(in one process: wall = per-point time x points / slots, the ideal with no launcher)")
    for note in notes:
        print(note)
    if goals:
        print(f"\n{'goal':<52}{'measured':>10}{'target':>10}")
        for what, measured, target in goals:
            print(f"{what:<52}{measured:>10}{target:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
