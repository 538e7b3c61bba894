"""A sweep, from Hydra's job overrides to one row per grid point.

The launcher (hydra_plugins/lrsweep_launcher) hands the grid to :func:`launch`:

1. plan (:mod:`.planning`): every point is composed (:mod:`.compose`) and validated before anything is
   submitted (a single bad point launches nothing: exit code 2) and looked up in the results dir;
   points whose row says ``ok`` are skipped;
2. pack and submit (:mod:`.submit`): the rest go into jobs (``hydra.launcher.points_per_job``: 1, K,
   or ``auto``: the points that share model, data and calibration in as many jobs as there are
   parallel slots) and to submitit, local processes with bounded parallelism or one SLURM array
   (with a manifest for ``python -m lrsweep.status``);
3. in each job (:mod:`.worker`): its points one after another through Hydra's run_job, sharing the
   dense model; with ``auto`` a job done with its own points takes over its siblings' unstarted ones;
4. collect (:mod:`.returns`): every point's JobReturn, in grid order; a job that dies without writing
   its points' rows gets ``failed`` rows from here for those points only;
5. report (:mod:`.outcome`): the table, the plot path and the summary line.

``dry_run=true`` lists the points with their status and estimated time, and stops.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from hydra.core.singleton import Singleton

from lrsweep.job import PointFailed
from lrsweep.row import now
from lrsweep import disk
from lrsweep.sweep import space, submit
from lrsweep.sweep.returns import collect, dead_row, job_return, row_of
from lrsweep.sweep.planning import Point, auto_device, check_gpus, pack, plan, points_per_job, slots, sweep_name  # noqa: F401
from lrsweep.sweep.outcome import Outcome, Prefetch, dry_run, report
from lrsweep.sweep.worker import claimed, share_points

log = logging.getLogger(__name__)

__all__ = ["Outcome", "Point", "PointFailed", "Prefetch", "dry_run", "launch", "report"]


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
           prefetch: Prefetch | None = None) -> Outcome:
    """Plan, skip what is ok, pack, submit, wait and account for every point (the Outcome's returns:
    one JobReturn per point, in grid order). ``prefetch`` starts importing the report's modules while
    the last jobs run."""
    prefetch = prefetch or Prefetch()
    points = plan(launcher, job_overrides, initial_job_idx)
    per_job = points_per_job(launcher.params.get("points_per_job", 1))
    slurm = launcher._EXECUTOR == "slurm"
    if slurm:
        submit.preflight(launcher.params)
    check_gpus(launcher.params, points)
    active = submit.active(points) if slurm else {}
    results_dir = points[0].results_dir if points else ""
    if points and points[0].get("dry_run"):
        space.preflight(points, launcher.params, 0, write=False)
        dry_run(points, active)
        return Outcome(results_dir, [p.run_id for p in points], dry_run=True)
    for p in points:
        if p.run_id in active and not p.get("force"):
            log.info(f"[lrsweep]   #{p.index} {p.run_id}: still queued or running as job {active[p.run_id]}, "
                     "not submitted again")
    points = [p for p in points if p.run_id not in active or p.get("force")]
    rows = {p.index: row_of(p) for p in points}  # each row read once: the skip check and its JobReturn
    done = {p.index for p in points if not p.get("force") and rows[p.index] is not None
            and rows[p.index].status == "ok"}
    todo = [p for p in points if p.index not in done]
    out = Outcome(results_dir, [p.run_id for p in points], len(todo), len(points) - len(todo),
                  todo=[p.run_id for p in todo])
    log.info(f"[lrsweep] {len(points)} grid points: {len(todo)} to run, {len(points) - len(todo)} already ok")
    returns = {p.index: job_return(p, rows[p.index], "an earlier launch") for p in points if p.index in done}
    if todo:
        jobs = pack(todo, per_job, slots(launcher))
        if len(jobs) < len(todo):
            log.info(f"[lrsweep] {len(todo)} points in {len(jobs)} jobs (points_per_job={per_job})")
        returns.update(_run(launcher, out, jobs, per_job, prefetch))
    out.returns = [returns[i] for i in sorted(returns)]
    return out


def _run(launcher: Any, out: Outcome, jobs: list[list[Point]], per_job: int | str, prefetch: Prefetch
         ) -> dict[int, Any]:
    """Submit the jobs, wait for them (unless detached) and collect their points' JobReturns by index.
    Ctrl-C or SIGTERM: the jobs are cancelled (:func:`interrupted`) and ``out.cancelled`` set."""
    slurm = launcher._EXECUTOR == "slurm"
    since = now()
    state = Singleton.get_state()
    peers = share_points(jobs) if per_job == "auto" else [None] * len(jobs)
    args = [(job, state, since, shared) for job, shared in zip(jobs, peers, strict=True)]
    space.preflight([p for job in jobs for p in job], launcher.params,
                    max(space.pickle_bytes((launcher, *a)) for a in args[:1]), write=True)
    ex = launcher.executor(per_job_points=max(len(j) for j in jobs))
    os.environ["LRSWEEP_THREADS"] = str(launcher.params.get("cpus_per_task") or "")
    out.since = since
    submitted: list[Any] = []
    returns: dict[int, Any] = {}
    with interruptible():
        try:
            if slurm:
                submitted += submit.submit_slurm(launcher, ex, args, sweep_name(launcher))
            else:
                submitted += submit.submit_local(launcher, ex, args, while_last=prefetch.start)
            out.job_ids = [str(j.job_id) for j in submitted]
            out.submitit_folder = str(Path(str(launcher.params["submitit_folder"])).parent)
            out.no_space += [disk.no_space(j.error, getattr(ex, "folder", None)) for j in submitted[-1:]
                             if isinstance(j, submit.NotSubmitted)]
            if not launcher.params.get("wait", True):
                out.detached = True
                return {}
            if slurm:  # the jobs run on the cluster's nodes
                prefetch.start()

            def dead(p: Point, job: Any, error: BaseException):
                prefetch.wait()  # the main thread imports while writing the row
                try:
                    return dead_row(p, job, error, slurm)
                except OSError as e:  # the row does not fit either: said once, in the summary
                    if not disk.is_full(e):
                        raise
                    line = disk.no_space(e, os.path.join(p.results_dir, "rows"))
                    if line not in out.no_space:
                        out.no_space.append(line)
                    return None

            for job, j in zip(jobs, submitted, strict=True):
                for p, ret in zip(job, collect(job, j, since, dead, claimed), strict=True):
                    returns[p.index] = ret
        except KeyboardInterrupt:
            interrupted(out, submitted, slurm)
    return returns


@contextmanager
def interruptible():
    """SIGTERM is a Ctrl-C (KeyboardInterrupt) while the sweep submits and waits."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(out: Outcome, jobs: list[Any], slurm: bool) -> None:
    """After Ctrl-C or SIGTERM: a second one exits at once (130); the jobs started are cancelled."""
    def now_exit(signum: int, frame: Any) -> None:
        os._exit(130)

    signal.signal(signal.SIGINT, now_exit)
    signal.signal(signal.SIGTERM, now_exit)
    out.cancelled = True
    print("\n[lrsweep] interrupted: cancelling the sweep's jobs (Ctrl-C again to exit at once)", flush=True)
    submit.cancel(jobs, slurm)
