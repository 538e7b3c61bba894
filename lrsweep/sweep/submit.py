"""Submitting a sweep's jobs through submitit: the executor, local processes or one SLURM array.

The launcher config maps to submitit's executor as hydra-submitit-launcher maps it (its
``BaseQueueConf`` keys by name, the others with the cluster's prefix, ``max_num_timeout`` at
construction), less lrsweep's own keys (:data:`OWN_KEYS`); ``timeout_min`` is per grid point,
so a job of N points gets N times it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from omegaconf import OmegaConf

from lrsweep.errors import ConfigError, did_you_mean
from lrsweep import disk
from lrsweep.sweep.planning import Point, gpus_requested, slots

log = logging.getLogger(__name__)

# launcher keys that are lrsweep's, not submitit's
OWN_KEYS = ("parallelism", "points_per_job", "wait", "extra")


def executor(launcher: Any, per_job_points: int = 1) -> Any:
    """The submitit executor of ``launcher``'s parameters for jobs of ``per_job_points`` points; makes
    the sweep dir (with ``hydra.sweep.mode``) as Hydra's launchers do."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cluster = launcher._EXECUTOR
    params = {k: v for k, v in launcher.params.items() if k not in OWN_KEYS}
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{cluster}_max_num_timeout"] = params.pop("max_num_timeout")
    params["timeout_min"] = int(params["timeout_min"]) * per_job_points
    ex = submitit.AutoExecutor(cluster=cluster, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"{cluster}_{k}": v for k, v in params.items()})
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    log.info(f"Submitit '{cluster}' sweep output dir : {sweep_dir}")
    return ex


def submit_local(launcher: Any, ex: Any, args: list[tuple], while_last: Callable[[], None]) -> list[Any]:
    """One process per job, at most ``parallelism`` running at once; ``while_last`` is called once a
    core is free until the last jobs end. A job that cannot be submitted for want of space (its pickle
    did not fit) and the ones after it are :class:`NotSubmitted`. Interrupted (Ctrl-C, SIGTERM), it
    cancels the jobs it started before it lets the interrupt go on."""
    limit = slots(launcher)
    pending, running, jobs = list(args), [], []
    try:
        while pending or running:
            running = [j for j in running if not j.done()]
            while pending and len(running) < limit:
                try:
                    job = submit_one(ex, launcher, pending[0])
                except OSError as e:
                    if not disk.is_full(e):
                        raise
                    line = disk.no_space(e, getattr(ex, "folder", None))
                    log.error(f"[lrsweep] {line}: {len(pending)} jobs not submitted")
                    jobs += [NotSubmitted(e, getattr(ex, "folder", ""))] * len(pending)
                    pending = []
                    break
                pending.pop(0)
                running.append(job)
                jobs.append(job)
            if not pending and len(running) < limit:
                while_last()
            time.sleep(0.1)
    except KeyboardInterrupt:
        cancel(jobs, slurm=False)
        raise
    return jobs


def submit_one(ex: Any, launcher: Any, args: tuple) -> Any:
    """``ex.submit(launcher, *args)``, leaving no partial pickle behind when it fails; the job's
    controller (submitit's process that runs a local job) writes its own messages (a traceback when
    Ctrl-C or :func:`cancel` stops it) to ``controllers.log`` in the job folder, not to this terminal."""
    if getattr(ex, "folder", None) is None:  # not submitit's (a test's)
        return ex.submit(launcher, *args)
    with no_partial_pickles(ex), _controller_streams(ex):
        return ex.submit(launcher, *args)


@contextmanager
def no_partial_pickles(ex: Any) -> Iterator[None]:
    """Remove the pickles submitit began in the executor's folder if the submission fails (a full
    disk, an interrupt): it writes ``<folder>/<uuid>.pkl`` and moves it to the job's folder once whole."""
    from submitit.core.utils import JobPaths

    if getattr(ex, "folder", None) is None:  # not submitit's (a test's)
        yield
        return
    folder = JobPaths.get_first_id_independent_folder(ex.folder)
    before = set(folder.glob("*.pkl")) if folder.is_dir() else set()
    try:
        yield
    except BaseException:
        for path in set(folder.glob("*.pkl")) - before if folder.is_dir() else ():
            path.unlink(missing_ok=True)
        raise


@contextmanager
def _controller_streams(ex: Any) -> Iterator[None]:
    """While a job starts, this process's stderr is the job folder's ``controllers.log`` (a local job's
    controller inherits it)."""
    from submitit.core.utils import JobPaths

    folder = JobPaths.get_first_id_independent_folder(ex.folder)
    folder.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved, log_fd = os.dup(2), os.open(folder / "controllers.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log_fd)


class NotSubmitted:
    """A job submitit could not take (its pickle did not fit on the disk): it ends at once, without
    a result, so that its points get failed rows (lrsweep.sweep.returns.collect) naming the disk."""

    def __init__(self, error: OSError, folder: Any):
        self.error, self.job_id, self.state = error, "not-submitted", "NOT SUBMITTED"
        self.paths = type("Paths", (), {"stdout": Path(str(folder))})()

    def done(self) -> bool:
        return True

    def results(self) -> list[Any]:
        raise self.error

    def stderr(self) -> str:
        return ""

    def cancel(self, check: bool = True) -> None:
        pass


def cancel(jobs: list[Any], slurm: bool, wait_s: float = 10.0) -> None:
    """Cancel the sweep's jobs: ``scancel`` of its SLURM array, or each local job's processes
    (submitit's ``job.cancel()``), waiting up to ``wait_s`` for them to end."""
    if slurm:
        arrays = sorted({str(j.job_id).split("_")[0] for j in jobs if not isinstance(j, NotSubmitted)})
        if arrays:
            subprocess.run(["scancel", *arrays], capture_output=True, timeout=60)
        return
    live = [j for j in jobs if not j.done()]
    for j in live:
        with contextlib.suppress(Exception):  # a job that ended meanwhile
            j.cancel(check=False)
    end = time.monotonic() + wait_s
    while live and time.monotonic() < end:
        live = [j for j in live if not j.done()]
        time.sleep(0.1)


def submit_slurm(launcher: Any, ex: Any, args: list[tuple], sweep_name: str) -> list[Any]:
    """One SLURM array (one task per job) and its manifest (``python -m lrsweep.status``)."""
    from submitit.core.utils import FailedJobError

    from lrsweep.status import write_manifest

    try:
        with no_partial_pickles(ex):
            jobs = ex.map_array(launcher, *zip(*args, strict=True))
    except FailedJobError as e:  # sbatch said no: its message verbatim, nothing was submitted
        raise ConfigError("hydra/launcher", f"sbatch refused the job array, nothing was submitted:\n"
                          f"{str(e).strip()}") from None
    array = str(jobs[0].job_id).split("_")[0]
    folder = str(Path(str(launcher.params["submitit_folder"])).parent)
    points = [(p, j) for (pts, *_), j in zip(args, jobs, strict=True) for p in pts]
    write_manifest(points[0][0].results_dir, sweep_name, array, folder,
                   [{"index": p.index, "run_id": p.run_id, "job_id": str(j.job_id), "overrides": p.describe().split()}
                    for p, j in points])
    log.info(f"[lrsweep] submitted SLURM array {array} ({len(jobs)} jobs); logs in {folder}")
    sys.stdout.flush()
    return jobs


def preflight(params: dict[str, Any]) -> None:
    """ConfigError (nothing submitted) for no sbatch, an unknown partition, GPUs the partition lacks."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ConfigError("hydra/launcher", "sbatch/sinfo are not on PATH: this machine cannot submit SLURM jobs",
                          ["hydra/launcher=local", "run from a SLURM login node"])
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ConfigError("hydra/launcher", f"sinfo failed, the SLURM controller is not reachable: "
                          f"{(out.stderr or out.stdout).strip()}")
    gres: dict[str, set[str]] = {}
    default = None
    for line in out.stdout.splitlines():
        name, _, g = line.strip().partition("|")
        if name.endswith("*"):
            name = default = name[:-1]
        gres.setdefault(name, set()).add(g)
    wanted = [q for q in str(params.get("partition") or default or "").split(",") if q]
    for q in wanted:
        if q not in gres:
            raise ConfigError("hydra.launcher.partition", f"{q!r} is not a partition of this cluster"
                              f"{did_you_mean(q, gres)}", sorted(gres))
    gpus = gpus_requested(params)
    for q in wanted if gpus > 0 else []:
        if not any("gpu" in g for g in gres[q]):
            raise ConfigError("hydra.launcher.gpus_per_node", f"{gpus} GPU(s) per node requested but "
                              f"partition {q!r} has no GPUs (gres {sorted(gres[q])})", [0])


def active(points: list[Point]) -> dict[str, str]:
    """run_id -> job id of the points still queued or running from an earlier submission."""
    if not points:
        return {}
    from lrsweep.status import active_run_ids

    return active_run_ids(points[0].results_dir)
