"""Planning a sweep: every grid point composed and validated, one :class:`Point` per experiment, then
packed into jobs.

A single bad point launches nothing (ConfigError: exit code 2). Two override lists that make one
experiment (the same run_id) run once. Points sharing the dense model (lrsweep.job.dense_key) can be
packed into one job (``hydra.launcher.points_per_job``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import filter_overrides
from omegaconf import DictConfig, OmegaConf

from lrsweep import identity, seeds
from lrsweep.errors import ConfigError
from lrsweep.sweep.compose import Composed, sweep_points

log = logging.getLogger(__name__)


class Point:
    """One grid point: its index in the grid, the overrides that make it, its config and run_id.

    ``cfg`` is the point's DictConfig, or a :class:`~lrsweep.sweep.compose.Composed` that makes it when a
    job first needs it; ``resolved`` (lrsweep.identity.resolved) is what planning reads, so a dry run
    composes no point's config."""

    def __init__(self, index: int, overrides: list[str], cfg: DictConfig | Composed, run_id: str):
        self.index, self.overrides, self.run_id = index, overrides, run_id
        self._composed = cfg if isinstance(cfg, Composed) else Composed(identity.resolved(cfg), cfg)

    @property
    def cfg(self) -> DictConfig:
        return self._composed.cfg

    @property
    def resolved(self) -> dict[str, Any]:
        return self._composed.resolved

    def get(self, key: str, default: Any = None) -> Any:
        """A top-level key of the point's resolved config."""
        return self.resolved.get(key, default)

    @property
    def results_dir(self) -> str:
        return os.path.abspath(str(self.get("results_dir")))

    def describe(self) -> str:
        return " ".join(filter_overrides(self.overrides))

    def __repr__(self) -> str:
        return f"Point(#{self.index} {self.run_id} {self.describe()!r})"


def sweep_name(launcher: Any) -> str:
    """The sweep's name (its W&B group and the rows' ``sweep``): the name of Hydra's sweep dir."""
    return Path(str(launcher.config.hydra.sweep.dir)).name


class Checks:
    """:func:`lrsweep.validate.validate` of a sweep's points: ``seed`` checked for each, the rest once
    for the points whose resolved configs differ only in their seed (a seed sweep's other checks do
    not repeat; lrsweep.validate.validate_experiment reads no seed)."""

    def __init__(self, check_device: bool):
        self.check_device, self.done = check_device, {}

    def __call__(self, composed: Composed) -> None:
        from lrsweep.validate import validate_experiment

        seeds.check_value(composed.resolved.get("seed"))
        key = json.dumps({k: v for k, v in composed.resolved.items() if k != "seed"}, sort_keys=True, default=str)
        if key not in self.done:
            try:
                with composed.applied() as cfg:
                    validate_experiment(cfg, check_device=self.check_device, resolved=composed.resolved)
                self.done[key] = None
            except ConfigError as e:
                self.done[key] = e
        if self.done[key] is not None:
            raise self.done[key]


def plan(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Point]:
    """Compose and validate every point; ConfigError (nothing launched) if any is invalid."""
    name = sweep_name(launcher)
    points, seen, errors = [], set(), []
    # a dry run's points are listed, not run: composed without Hydra's node (unless one is not a dry run)
    dry = bool(OmegaConf.select(launcher.config, "dry_run", default=False))
    loader, extra = launcher.hydra_context.config_loader, {"sweep_name": name}
    composed = sweep_points(loader, launcher.config, job_overrides, with_hydra=not dry, extra=extra)
    if dry and not all(isinstance(c, Exception) or c.resolved.get("dry_run") for c in composed):
        composed, dry = sweep_points(loader, launcher.config, job_overrides, extra=extra), False
    job_overrides, composed = with_seeds(job_overrides, composed, lambda grid: sweep_points(
        loader, launcher.config, grid, with_hydra=not dry, extra=extra))
    check, device = Checks(check_device=launcher._EXECUTOR == "local"), auto_device(launcher)
    for i, (ov, c) in enumerate(zip(job_overrides, composed, strict=True)):
        if isinstance(c, Exception):  # Hydra could not compose the point: its error
            raise c
        try:
            check(c)
        except ConfigError as e:
            errors.append(f"point #{initial_job_idx + i} ({' '.join(filter_overrides(ov))}): {e}")
            continue
        rid = identity.run_id_of(c.resolved, device)
        if rid not in seen:  # two override lists, one experiment: run it once
            seen.add(rid)
            points.append(Point(initial_job_idx + i, list(ov), c, rid))
    if errors:
        raise ConfigError("sweep", f"{len(errors)} of {len(job_overrides)} grid points are invalid, "
                          "nothing was launched:\n  " + "\n  ".join(errors))
    if note := seeds.single_seed_note(p.resolved for p in points):
        log.warning(note)
    if not dry:  # a job's config is made here, once, so that its errors are the planner's
        for p in points:
            p.cfg  # noqa: B018
    return points


def with_seeds(job_overrides: Sequence[Sequence[str]], composed: list[Any], compose: Any
               ) -> tuple[list[list[str]], list[Any]]:
    """The grid with each point of a randomized method followed by its points at more seeds
    (lrsweep.seeds.more: ``seeds`` of them in all, unless the grid sets ``seed``); ``compose`` makes
    the added points (:func:`~lrsweep.sweep.compose.sweep_points` of their override lists)."""
    more = {i: seeds.more(c.resolved, ov) for i, (ov, c) in enumerate(zip(job_overrides, composed, strict=True))
            if not isinstance(c, Exception)}
    added = [[*job_overrides[i], f"seed={s}"] for i in sorted(more) for s in more[i]]
    made = iter(compose(added) if added else [])
    grid, out = [], []
    for i, (ov, c) in enumerate(zip(job_overrides, composed, strict=True)):
        grid.append(list(ov))
        out.append(c)
        for s in more.get(i, []):
            grid.append([*ov, f"seed={s}"])
            out.append(next(made))
    return grid, out


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
    if per_job == 1:
        return [[p] for p in points]
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(identity.dense_key_of(p.resolved), []).append(p)
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
    """What ``device=auto`` is in this sweep's jobs (for their run_ids, lrsweep.identity.run_id): a job sees
    the GPUs its launcher requests (submitit's local jobs too: CUDA_VISIBLE_DEVICES), none without; a local job's
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
        if str(p.get("device")).startswith("cuda"):
            raise ConfigError("device", f"{p.get('device')!r} but the jobs ask for no GPU "
                              "(hydra.launcher.gpus_per_node=0)", ["auto", "cpu", "hydra.launcher.gpus_per_node=1"])
