"""Inside a sweep's job: its grid points one after another, each through Hydra's run_job.

Every point runs under its claim (:func:`claimed`, a file lock per point and launch that dies with
its process). With ``points_per_job=auto`` the jobs of a dense model share their points
(:func:`share_points`): a job done with its own points takes over its siblings' unclaimed points
without a row while its time limit allows, and an own point a sibling holds is waited for at the
end (and run here if that sibling died before writing its row).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from hydra.core.utils import JobReturn, run_job
from omegaconf import OmegaConf, open_dict, read_write

from lrsweep.pack import Pack
from lrsweep.sweep.returns import job_return, written_since
from lrsweep.sweep.planning import Point

log = logging.getLogger(__name__)

# how many sibling jobs (the next ones of its dense model, in a ring) a job may take points over from:
# each job's pickle carries their points too, so it grows (1 + this) times, not with the array's size
SIBLINGS = 3

Peers = tuple[int, list[list[Point]]]  # (points of the launch's largest job, the sibling jobs' points)


def launch_folder(p: Point, since: str) -> Path | None:
    """The folder one launch of a sweep shares between its jobs (``<sweep dir>/.lrsweep/<launch time>``):
    the points' claims and the dense latencies. Absolute: a point's run_job may chdir."""
    sweep_dir = OmegaConf.select(p.cfg, "hydra.sweep.dir")
    if not sweep_dir:
        return None
    return Path(os.path.abspath(str(sweep_dir))) / ".lrsweep" / re.sub(r"[^0-9A-Za-z]", "", since)


@contextmanager
def claimed(p: Point, since: str, wait: bool) -> Iterator[bool]:
    """Hold the point's claim for this launch: True once held, False when another process holds it
    and ``wait`` is false. The process holding it is the one running the point, or the launcher
    writing its failed row."""
    from filelock import FileLock, Timeout

    folder = launch_folder(p, since)
    if folder is None:
        yield True
        return
    (folder / "claims").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / "claims" / f"{p.run_id}.lock"))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def share_points(jobs: list[list[Point]]) -> list[Peers | None]:
    """Per job: (the points of the launch's largest job, which its time limit was sized for; the points
    of its next :data:`SIBLINGS` sibling jobs of the same dense model), or None without a sibling."""
    from lrsweep.job import dense_key

    keys = [dense_key(job[0].cfg) for job in jobs]
    largest = max(map(len, jobs), default=0)
    out: list[Peers | None] = []
    for i, key in enumerate(keys):
        group = [j for j in range(len(jobs)) if keys[j] == key]
        at = group.index(i)
        ring = [jobs[group[(at + k) % len(group)]] for k in range(1, min(SIBLINGS, len(group) - 1) + 1)]
        out.append((largest, ring) if ring else None)
    return out


def _takeover(peers: Peers | None) -> tuple[list[Point], int]:
    """(the sibling jobs' points this job may take over, the ones their jobs would reach last first;
    the points of the launch's largest job)."""
    if not peers:
        return [], 0
    largest, siblings = peers
    depth = max((len(job) for job in siblings), default=0)
    return [job[k] for k in reversed(range(depth)) for job in siblings if k < len(job)], largest


def run_pack(launcher: Any, pack: Pack, pts: list[Point], since: str, peers: Peers | None = None
             ) -> list[JobReturn]:
    """Run a job's points (one row each) in ``pack``; their JobReturns in the job's order. A point
    already ok since the launch (a requeued job) is not run again."""
    import submitit

    t0, longest = time.monotonic(), 0.0
    job_id = submitit.JobEnvironment().job_id
    rets: dict[int, JobReturn] = {}

    def run(p: Point) -> JobReturn:
        nonlocal longest
        t = time.monotonic()
        ret = run_point(launcher, pack, p, job_id, since)
        longest = max(longest, time.monotonic() - t)
        return ret

    held = []
    for p in pts:
        with claimed(p, since, wait=False) as mine:
            if not mine:  # a sibling took it over
                held.append(p)
                continue
            done = written_since(p, since)
            rets[p.index] = job_return(p, done, job_id) if done is not None and done.status == "ok" else run(p)
    others, largest = _takeover(peers)
    limit = float(launcher.params.get("timeout_min") or 0) * 60 * largest
    for q in others:
        if time.monotonic() - t0 + 2 * longest >= limit:
            break
        with claimed(q, since, wait=False) as mine:
            if mine and written_since(q, since) is None:
                log.info(f"[lrsweep] taking over #{q.index} {q.run_id} from a sibling job")
                pack.taken_over = True
                try:
                    run(q)
                finally:
                    pack.taken_over = False
    for p in held:
        with claimed(p, since, wait=True):
            row = written_since(p, since)
            rets[p.index] = job_return(p, row, job_id) if row is not None else run(p)
    return [rets[p.index] for p in pts]


def run_point(launcher: Any, pack: Pack, p: Point, job_id: str, since: str) -> JobReturn:
    """One point through Hydra's run_job (its output dir, .hydra files and logging), lrsweep.job inside."""
    from lrsweep import job

    # the config composed and validated at launch: a queued job must not pick up conf/ or code
    # edits made after it, or its row would land under another run_id than the sweep waits for
    config = copy.deepcopy(p.cfg)
    with read_write(config.hydra.job), open_dict(config.hydra.job):
        config.hydra.job.id = job_id
        config.hydra.job.num = p.index
    ret = run_job(hydra_context=launcher.hydra_context, task_function=functools.partial(job.sweep_point, pack=pack),
                  config=config, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    if written_since(p, since) is None:  # raised before any row was written: the point's failed row
        error: BaseException = RuntimeError("no row written")
        if ret.status.name == "FAILED":
            try:
                ret.return_value  # noqa: B018  (raises the task's exception)
            except Exception as e:
                error = e
        job.write_failed(p.cfg, error)
    return ret
