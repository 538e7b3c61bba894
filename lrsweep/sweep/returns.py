"""Collecting a sweep's results: each point's JobReturn, and failed rows for the points of a job that
died without writing them (killed, out of memory, timed out)."""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from pathlib import Path
from typing import Any
from collections.abc import Callable

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict, read_write

from lrsweep.job import PointFailed
from lrsweep.row import ResultRow, load_row, row_path
from lrsweep.sweep.planning import Point


def row_of(p: Point) -> ResultRow | None:
    """The point's row as it is on disk (None: none, or damaged: reported by load_row)."""
    return load_row(row_path(p.results_dir, p.run_id))


def written_since(p: Point, since: str) -> ResultRow | None:
    """The point's row if this launch wrote it (finished at or after ``since``), else None."""
    row = row_of(p)
    return row if row is not None and (row.finished_at or "") >= since else None


def job_return(p: Point, row: ResultRow | None, job_id: str, error: BaseException | None = None) -> JobReturn:
    """The JobReturn of a point that was not run through Hydra's run_job in this process (its row
    was written by a sibling job, an earlier launch, or the launcher for a dead job), with the fields
    run_job gives: the task's overrides and config, Hydra's config, the working dir (the job's output
    dir with ``hydra.job.chdir``, else the current one), and the status of its row (COMPLETED for
    ok, FAILED with PointFailed otherwise). ``job_id``: the job returning it (``hydra.job.id``)."""
    hydra_cfg = OmegaConf.masked_copy(p.cfg, ["hydra"] if "hydra" in p.cfg else [])
    try:
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            OmegaConf.update(hydra_cfg, "hydra.job.num", p.index, force_add=True)
            OmegaConf.update(hydra_cfg, "hydra.job.id", job_id, force_add=True)
        output = Path(str(hydra_cfg.hydra.sweep.dir)) / str(hydra_cfg.hydra.sweep.subdir)
        working_dir = str(output) if hydra_cfg.hydra.job.chdir else os.getcwd()
    except Exception:  # no sweep dir, or a subdir naming what only the job sets: ${hydra.job.id}
        working_dir = None
    task = OmegaConf.select(p.cfg, "hydra.overrides.task", default=None)
    ret = JobReturn(overrides=list(p.overrides) if task is None else OmegaConf.to_container(task),
                    cfg=OmegaConf.masked_copy(p.cfg, [k for k in p.cfg if k != "hydra"]),
                    hydra_cfg=hydra_cfg, working_dir=working_dir)
    ret.task_name = OmegaConf.select(hydra_cfg, "hydra.job.name", default=None)
    if row is not None and row.status == "ok":
        ret.status, ret.return_value = JobStatus.COMPLETED, "ok"
    else:
        msg = (row.error or {}).get("message", "") if row is not None else str(error)
        ret.status, ret.return_value = JobStatus.FAILED, PointFailed(f"{p.run_id} ({p.describe()}): {msg}")
    return ret


def collect(pts: list[Point], job: Any, since: str, dead: Callable[[Point, Any, BaseException], ResultRow | None],
            claimed: Callable[..., Any]) -> list[JobReturn]:
    """The job's JobReturns; a job that died gets ``dead(point, job, error)`` rows for its points
    without a row, each under the point's claim (a sibling job may be running it); None from ``dead``:
    no row could be written (a full disk), the point's JobReturn says the job's error."""
    try:
        while not job.done():  # submitit's results() looks once a second; a result file is a cheap stat
            time.sleep(0.2)
        return job.results()[0]
    except Exception as e:  # killed, timed out, out of memory, ...
        error = e
    drop_partial_result(job)
    out = []
    for p in pts:
        with claimed(p, since, wait=True):
            row = written_since(p, since)
            if row is None:
                row = dead(p, job, error)
        out.append(job_return(p, row, str(job.job_id), error))
    return out


def drop_partial_result(job: Any) -> None:
    """submitit's job writes its result pickle to ``<result>.save_tmp`` and renames it once whole: a
    job that ended without a result (the disk filled up under it, or it was killed while writing)
    leaves that file behind, empty or cut short. Removed, the job being over."""
    result = getattr(getattr(job, "paths", None), "result_pickle", None)
    if result is not None:
        with contextlib.suppress(OSError):
            Path(f"{result}.save_tmp").unlink(missing_ok=True)


def dead_row(p: Point, job: Any, error: BaseException, slurm: bool) -> ResultRow:
    """The failed row of a point whose job ended without writing it, with submitit's view of the job."""
    from lrsweep.job import write_failed

    state = getattr(job, "state", "")
    # submitit's first two lines say what happened ("... has not produced any output (state: ...)")
    first = " ".join(str(error).strip().splitlines()[:2])
    # without the hydra node: its runtime interpolations are only set inside the job
    return write_failed(OmegaConf.masked_copy(p.cfg, [k for k in p.cfg if k != "hydra"]), error,
                        f"job {job.job_id} ended without a row (state {state}; killed, out of memory or crashed): "
                        f"{first}",
                        (job.stderr() or "")[-4000:] + "\n" + "".join(traceback.format_exception(error)),
                        slurm_job_id=str(job.job_id) if slurm else None,
                        log_path=str(job.paths.stdout), extra={"job_state": state})
