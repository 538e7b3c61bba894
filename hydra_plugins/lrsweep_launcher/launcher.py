"""Hydra launchers for sweeps: hydra-submitit-launcher's, plus what a sweep of experiments needs.

Before anything is submitted, every grid point is composed, validated (a single bad point
launches nothing: exit code 2) and looked up in the results dir: points whose row says ``ok``
are skipped. The rest go to submitit — local processes with bounded parallelism, or one SLURM
array — and a job that dies without writing its row (killed, out of memory, timed out) gets a
``failed`` row from here, with submitit's error and the tail of its stderr.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf

from lrsweep import identity
from lrsweep.errors import ConfigError
from lrsweep.row import row_status, write_row


@dataclass
class LrsweepLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.lrsweep_launcher.launcher.LocalLauncher"
    parallelism: int = 2  # grid points running at once (size to the machine's cores / cpus_per_task)
    # submitit sends USR2 30 s before timeout_min; a timed-out point then fails (it would time out again
    # if rerun from scratch), a preempted one (USR2 before that, e.g. job._interrupt()) is requeued
    max_num_timeout: int = 0


@dataclass
class LrsweepSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.lrsweep_launcher.launcher.SlurmLauncher"
    wait: bool = True  # false: submit the array, print job ids and return (detached sweep)
    extra: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="lrsweep_local", node=LrsweepLocalConf, provider="lrsweep")
ConfigStore.instance().store(group="hydra/launcher", name="lrsweep_slurm", node=LrsweepSlurmConf, provider="lrsweep")


@dataclass
class Point:
    index: int
    overrides: list[str]
    cfg: DictConfig
    run_id: str


@dataclass
class SweepOutcome:
    """What the last sweep (or single run) of this process did; read by lrsweep.cli."""

    results_dir: str
    run_ids: list[str]
    submitted: int = 0
    skipped: int = 0
    job_ids: list[str] = field(default_factory=list)
    submitit_folder: str = ""
    detached: bool = False


LAST: SweepOutcome | None = None

# launcher keys that are ours, not submitit's
OWN_KEYS = ("parallelism", "wait", "extra")


class SweepLauncher(BaseSubmititLauncher):
    """Validate, skip what is done, submit the rest, turn dead jobs into failed rows."""

    def plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Point]:
        from lrsweep.validate import validate

        assert self.config is not None and self.hydra_context is not None
        sweep_name = Path(str(self.config.hydra.sweep.dir)).name
        points, seen, errors = [], {}, []
        for i, ov in enumerate(job_overrides):
            ov = [*ov, f"sweep_name={sweep_name}"]
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, ov)
                validate(cfg, check_device=self._EXECUTOR == "local")
            except ConfigError as e:
                errors.append(f"point #{initial_job_idx + i} ({' '.join(filter_overrides(ov[:-1]))}): {e}")
                continue
            rid = identity.run_id(cfg)
            if rid in seen:  # two override lists, one experiment: run it once
                continue
            seen[rid] = True
            points.append(Point(initial_job_idx + i, ov, cfg, rid))
        if errors:
            raise ConfigError("sweep", f"{len(errors)} of {len(job_overrides)} grid points are invalid, "
                              "nothing was launched:\n  " + "\n  ".join(errors))
        return points

    def executor(self):
        """A submitit executor from the launcher config (the plugin's parameter mapping)."""
        import submitit

        params = {k: v for k, v in self.params.items() if k not in OWN_KEYS}
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(LocalQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def job_args(self, p: Point) -> tuple:
        return (p.overrides, "hydra.sweep.dir", p.index, f"job_id_for_{p.index}", Singleton.get_state(), p.cfg)

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict, planned: DictConfig | None = None) -> JobReturn:
        """Run the job on the config composed and validated at launch (``planned``), not on a
        fresh composition: a queued job must not pick up conf/ or code edits made after the
        launch, or its row would land under another run_id than the one the sweep waits for."""
        if planned is None:
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        import copy

        import submitit
        from hydra.core.utils import run_job, setup_globals
        from omegaconf import open_dict, read_write

        assert self.hydra_context is not None and self.task_function is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        config = copy.deepcopy(planned)  # run_job makes it read-only; a requeued job starts again from here
        with read_write(config.hydra.job), open_dict(config.hydra.job):
            config.hydra.job.id = submitit.JobEnvironment().job_id
            config.hydra.job.num = job_num
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                       job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")

    def submit(self, executor, points: list[Point]) -> list[Any]:
        raise NotImplementedError

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        global LAST
        assert self.config is not None
        points = self.plan(job_overrides, initial_job_idx)
        results_dir = os.path.abspath(str(points[0].cfg.results_dir)) if points else ""
        todo = [p for p in points if row_status(os.path.abspath(str(p.cfg.results_dir)), p.run_id) != "ok"
                or p.cfg.get("force")]
        LAST = SweepOutcome(results_dir, [p.run_id for p in points], len(todo), len(points) - len(todo))
        print(f"[lrsweep] {len(points)} grid points: {len(todo)} to run, {len(points) - len(todo)} already ok")
        if not todo:
            return []
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        for p in todo:
            print(f"[lrsweep]   #{p.index} {p.run_id}: {' '.join(filter_overrides(p.overrides[:-1]))}")
        executor = self.executor()
        os.environ["LRSWEEP_THREADS"] = str(self.params.get("cpus_per_task") or "")
        jobs = self.submit(executor, todo)
        LAST.job_ids = [str(j.job_id) for j in jobs]
        LAST.submitit_folder = str(Path(str(self.params["submitit_folder"])).parent)
        if not self.params.get("wait", True):
            LAST.detached = True
            return []
        return [self.collect(p, j) for p, j in zip(todo, jobs)]

    def collect(self, p: Point, job: Any) -> JobReturn:
        """The job's JobReturn; a job that died or raised without a row gets a failed row here."""
        try:
            ret = job.results()[0]
            if ret.status != JobStatus.FAILED:
                return ret
            error = ret._return_value  # an exception outside lrsweep's row handling (e.g. an import)
        except Exception as e:  # killed, timed out, out of memory, ...
            error = e
        results_dir = os.path.abspath(str(p.cfg.results_dir))
        if row_status(results_dir, p.run_id) != "ok":
            from lrsweep.job import new_row

            # without the hydra node: its runtime interpolations are only set inside the job
            row = new_row(OmegaConf.masked_copy(p.cfg, [k for k in p.cfg if k != "hydra"]))
            row.slurm_job_id = str(job.job_id) if self._EXECUTOR == "slurm" else None
            row.log_path = str(job.paths.stdout)
            state = getattr(job, "state", "")
            # submitit's first two lines say what happened ("... has not produced any output (state: ...)")
            first = " ".join(str(error).strip().splitlines()[:2])
            row.error = {"type": type(error).__name__,
                         "message": f"job {job.job_id} ended without a row (state {state}; killed, out of memory "
                                    f"or crashed): {first}",
                         "traceback": (job.stderr() or "")[-4000:] + "\n" + "".join(traceback.format_exception(error))}
            row.extra["job_state"] = state
            write_row(results_dir, row)
        ret = JobReturn()
        ret.status = JobStatus.COMPLETED  # failures are reported through rows and the exit code
        ret._return_value = "failed"
        return ret


class LocalLauncher(SweepLauncher):
    _EXECUTOR = "local"

    def submit(self, executor, points: list[Point]) -> list[Any]:
        """Submit one process per point, at most ``parallelism`` running at once."""
        limit = max(1, int(self.params.get("parallelism") or 1))
        pending, running, jobs = list(points), [], []
        while pending or running:
            running = [j for j in running if not j.done()]
            while pending and len(running) < limit:
                job = executor.submit(self, *self.job_args(pending.pop(0)))
                running.append(job)
                jobs.append(job)
            time.sleep(0.2)
        return jobs


class SlurmLauncher(SweepLauncher):
    """One SLURM job array per sweep, checked against the cluster before anything is submitted.

    Jobs are checkpointable: on USR2 (preemption, or ``signal_delay_s`` before the time limit)
    the running point's stage is saved (lrsweep.checkpoint) and submitit requeues the job, which
    reruns the point; time-outs are requeued at most ``max_num_timeout`` times.
    """

    _EXECUTOR = "slurm"

    def plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Point]:
        points = super().plan(job_overrides, initial_job_idx)
        self.preflight(points)
        if not points:
            return points
        from lrsweep.status import active_run_ids

        active = active_run_ids(os.path.abspath(str(points[0].cfg.results_dir)))
        for p in points:
            if p.run_id in active and not p.cfg.get("force"):
                print(f"[lrsweep]   #{p.index} {p.run_id}: still queued or running as job {active[p.run_id]}, "
                      "not submitted again")
        return [p for p in points if p.run_id not in active or p.cfg.get("force")]

    def preflight(self, points: list[Point]) -> None:
        """ConfigError (nothing submitted) for no sbatch, an unknown partition, GPUs the partition lacks."""
        import shutil
        import subprocess

        from lrsweep.errors import did_you_mean

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
        wanted = [q for q in str(self.params.get("partition") or default or "").split(",") if q]
        for q in wanted:
            if q not in gres:
                raise ConfigError("hydra.launcher.partition", f"{q!r} is not a partition of this cluster"
                                  f"{did_you_mean(q, gres)}", sorted(gres))
        gpus = int(self.params.get("gpus_per_node") or 0) or int(self.params.get("gpus_per_task") or 0) \
            or int("gpu" in str(self.params.get("gres") or ""))
        if gpus > 0:
            for q in wanted:
                if not any("gpu" in g for g in gres[q]):
                    raise ConfigError("hydra.launcher.gpus_per_node", f"{gpus} GPU(s) per node requested but "
                                      f"partition {q!r} has no GPUs (gres {sorted(gres[q])})", [0])
        else:
            for p in points:
                if str(p.cfg.device).startswith("cuda"):
                    raise ConfigError("device", f"{p.cfg.device!r} but the jobs ask for no GPU "
                                      "(hydra.launcher.gpus_per_node=0)", ["auto", "cpu"])

    def submit(self, executor, points: list[Point]) -> list[Any]:
        from submitit.core.utils import FailedJobError

        from lrsweep.status import write_manifest

        try:
            jobs = executor.map_array(self, *zip(*[self.job_args(p) for p in points]))
        except FailedJobError as e:  # sbatch said no: its message verbatim, nothing was submitted
            raise ConfigError("hydra/launcher", f"sbatch refused the job array, nothing was submitted:\n"
                              f"{str(e).strip()}") from None
        array = str(jobs[0].job_id).split("_")[0]
        folder = str(Path(str(self.params["submitit_folder"])).parent)
        results_dir = os.path.abspath(str(points[0].cfg.results_dir))
        write_manifest(results_dir, Path(str(self.config.hydra.sweep.dir)).name, array, folder,
                       [{"index": p.index, "run_id": p.run_id, "job_id": str(j.job_id),
                         "overrides": list(filter_overrides(p.overrides[:-1]))} for p, j in zip(points, jobs)])
        print(f"[lrsweep] submitted SLURM array {array} ({len(jobs)} jobs); logs in {folder}")
        sys.stdout.flush()
        return jobs

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """On USR2 in the job: save the running point's stage, then let submitit requeue the job."""
        from lrsweep import checkpoint

        checkpoint.save("USR2: preempted or near the time limit")
        return super().checkpoint(*args, **kwargs)
