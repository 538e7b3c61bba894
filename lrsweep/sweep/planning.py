"""Planning a sweep: every grid point composed and validated, one :class:`Point` per experiment, then
packed into jobs.

A single bad point launches nothing (ConfigError: exit code 2). Two override lists that make one
experiment (the same run_id) run once. Points sharing the dense model (lrsweep.job.dense_key) can be
packed into one job (``hydra.launcher.points_per_job``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

from lrsweep import identity, seeds
from lrsweep.errors import ConfigError
from lrsweep.sweep.compose import sweep_configs

log = logging.getLogger(__name__)


@dataclass
class Point:
    """One grid point: its index in the grid, the overrides that make it, its config and run_id."""

    index: int
    overrides: list[str]
    cfg: DictConfig
    run_id: str

    @property
    def results_dir(self) -> str:
        return os.path.abspath(str(self.cfg.results_dir))

    def describe(self) -> str:
        return " ".join(filter_overrides(self.overrides))


def sweep_name(launcher: Any) -> str:
    """The sweep's name (its W&B group and the rows' ``sweep``): the name of Hydra's sweep dir."""
    return Path(str(launcher.config.hydra.sweep.dir)).name


def plan(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Point]:
    """Compose and validate every point; ConfigError (nothing launched) if any is invalid."""
    from lrsweep.validate import validate

    name = sweep_name(launcher)
    points, seen, errors = [], set(), []
    # a dry run's points are listed, not run: composed without Hydra's node (unless one is not a dry run)
    dry = bool(OmegaConf.select(launcher.config, "dry_run", default=False))
    configs = sweep_configs(launcher.hydra_context.config_loader, launcher.config, job_overrides, with_hydra=not dry)
    if dry and not all(isinstance(c, Exception) or c.get("dry_run") for c in configs):
        configs = sweep_configs(launcher.hydra_context.config_loader, launcher.config, job_overrides)
    for i, (ov, cfg) in enumerate(zip(job_overrides, configs)):
        if isinstance(cfg, Exception):  # Hydra could not compose the point: its error
            raise cfg
        with open_dict(cfg):
            cfg.sweep_name = name
        try:
            validate(cfg, check_device=launcher._EXECUTOR == "local")
        except ConfigError as e:
            errors.append(f"point #{initial_job_idx + i} ({' '.join(filter_overrides(ov))}): {e}")
            continue
        rid = identity.run_id(cfg, auto_device(launcher))
        if rid not in seen:  # two override lists, one experiment: run it once
            seen.add(rid)
            points.append(Point(initial_job_idx + i, list(ov), cfg, rid))
    if errors:
        raise ConfigError("sweep", f"{len(errors)} of {len(job_overrides)} grid points are invalid, "
                          "nothing was launched:\n  " + "\n  ".join(errors))
    if note := seeds.single_seed_note(p.cfg for p in points):
        log.warning(note)
    return points


def points_per_job(value: Any) -> int | str:
    """``hydra.launcher.points_per_job``: a positive int or ``auto``."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ConfigError("hydra.launcher.points_per_job", f"{value!r} is not a positive integer or auto",
                      ["auto", "1", "2", "..."])


def pack(points: list[Point], per_job: int | str, slots: int) -> list[list[Point]]:
    """Jobs of points that share the dense model (lrsweep.job.dense_key): K points in grid order, or
    (``auto``) each group's points dealt round-robin into as few jobs of at most ceil(points / slots)
    points, so that the jobs of a method x rank grid hold a similar mix of methods and end together."""
    from lrsweep.job import dense_key

    if per_job == 1:
        return [[p] for p in points]
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(dense_key(p.cfg), []).append(p)
    jobs = []
    for group in groups.values():
        n = len(group)
        if per_job == "auto":
            k = -(-n // min(slots, n))  # points per job (ceil), in as few jobs as that allows
            m = -(-n // k)
            jobs += [group[i::m] for i in range(m)]  # dealt, not cut in runs: grid neighbours (one method) cost alike
        else:
            jobs += [group[i:i + int(per_job)] for i in range(0, n, int(per_job))]
    return jobs


def slots(launcher: Any) -> int:
    """Jobs running at once: the local launcher's ``parallelism``, SLURM's ``array_parallelism``."""
    key = "parallelism" if launcher._EXECUTOR == "local" else "array_parallelism"
    return max(1, int(launcher.params.get(key) or 1))


def gpus_requested(params: Any) -> int:
    """GPUs per job asked of the launcher (gpus_per_node, gpus_per_task, or a gpu gres)."""
    return int(params.get("gpus_per_node") or 0) or int(params.get("gpus_per_task") or 0) \
        or int("gpu" in str(params.get("gres") or ""))


def auto_device(launcher: Any) -> str | None:
    """What ``device=auto`` is in this sweep's jobs (for their run_ids, lrsweep.identity.run_id): a job sees the GPUs its
    launcher requests (submitit's local jobs too: CUDA_VISIBLE_DEVICES), none without; a local job's
    are this machine's (None: cuda when available here), a SLURM job's cuda."""
    if not gpus_requested(launcher.params):
        return "cpu"
    return None if launcher._EXECUTOR == "local" else "cuda"


def check_gpus(params: dict[str, Any], points: list[Point]) -> None:
    """ConfigError for device=cuda in jobs that ask for no GPU: they see none (submitit's local jobs
    get CUDA_VISIBLE_DEVICES='' unless hydra.launcher.gpus_per_node is set)."""
    if gpus_requested(params):
        return
    for p in points:
        if str(p.cfg.device).startswith("cuda"):
            raise ConfigError("device", f"{p.cfg.device!r} but the jobs ask for no GPU "
                              "(hydra.launcher.gpus_per_node=0)", ["auto", "cpu", "hydra.launcher.gpus_per_node=1"])
