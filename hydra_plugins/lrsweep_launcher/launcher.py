"""Hydra launchers and sweeper for lrsweep's app (``python -m lrsweep -m ...``).

Hydra imports every module under hydra_plugins/ for every Hydra app in the environment, so this
one imports nothing heavy (no torch, no lrsweep, no submitit: they load when a sweep launches, as
hydra-submitit-launcher's do) and no ``from __future__ import annotations`` (Hydra's scan executes
the module before it is in sys.modules, where dataclasses look string annotations up).

The launchers take hydra-submitit-launcher's queue parameters plus lrsweep's own (packing, the
local launcher's parallelism, detached SLURM sweeps); :mod:`lrsweep.sweep` plans, submits and
collects. They serve lrsweep's app only: another app that picks them is told, in one line, to use
``submitit_local`` or ``submitit_slurm``. :class:`GridSweeper` is Hydra's basic sweeper's grid (the
same cartesian product of the command line's sweeps, ``max_batch_size``, ``params``, the sweep's
``multirun.yaml``) on Hydra's public Sweeper interface; it leaves composing and checking each point to
the launcher, which composes every point once (lrsweep.sweep.planning).
"""

import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf


@dataclass
class LrsweepLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.lrsweep_launcher.launcher.LocalLauncher"
    parallelism: int = 2  # jobs running at once (size to the machine's cores / cpus_per_task)
    # grid points per job: an int, or auto (the points sharing model, data and calibration in `parallelism` jobs)
    points_per_job: Any = 1
    # submitit sends USR2 30 s before timeout_min; a timed-out point then fails (it would time out again
    # if rerun from scratch), a preempted one (USR2 before that) is requeued
    max_num_timeout: int = 0


@dataclass
class LrsweepSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.lrsweep_launcher.launcher.SlurmLauncher"
    points_per_job: Any = 1  # an int, or auto: the points sharing model, data and calibration in array_parallelism jobs
    wait: bool = True  # false: submit the array, print job ids and return (detached sweep)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridSweeperConf:
    _target_: str = "hydra_plugins.lrsweep_launcher.launcher.GridSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None


ConfigStore.instance().store(group="hydra/launcher", name="lrsweep_local", node=LrsweepLocalConf, provider="lrsweep")
ConfigStore.instance().store(group="hydra/launcher", name="lrsweep_slurm", node=LrsweepSlurmConf, provider="lrsweep")
ConfigStore.instance().store(group="hydra/sweeper", name="lrsweep", node=GridSweeperConf, provider="lrsweep")

CONF = Path(__file__).resolve().parents[2] / "conf"  # lrsweep's config dir: its app is the one these launchers serve


def _serves(config: Any) -> bool:
    """Whether the app composing ``config`` is lrsweep's: its primary config comes from lrsweep's conf/."""
    sources = OmegaConf.select(config, "hydra.runtime.config_sources") or []
    return any(s.get("provider") == "main" and Path(str(s.get("path")).split("://")[-1]).resolve() == CONF
               for s in sources)


class SweepLauncher(BaseSubmititLauncher):
    """Hydra's side of a sweep: lrsweep.sweep plans and runs it, this class talks to Hydra and submitit."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not _serves(self.config):
            name = "submitit_slurm" if self._EXECUTOR == "slurm" else "submitit_local"
            print(f"hydra/launcher=lrsweep_{self._EXECUTOR} serves lrsweep's app (python -m lrsweep); "
                  f"for this app use hydra/launcher={name}", file=sys.stderr)
            sys.exit(2)
        from lrsweep import sweep

        prefetch = sweep.Prefetch()
        outcome = sweep.launch(self, job_overrides, initial_job_idx, prefetch)
        if sweep.report(outcome, prefetch) == 130:  # interrupted: summary printed, the jobs cancelled
            raise KeyboardInterrupt
        return outcome.returns

    def executor(self, per_job_points: int = 1) -> Any:
        """The submitit executor of this launcher's parameters (lrsweep.sweep.submit.executor)."""
        from lrsweep.sweep import submit

        return submit.executor(self, per_job_points)

    def __call__(self, points: list[Any], singleton_state: dict[Any, Any], since: str,  # type: ignore[override]
                 peers: Any = None) -> list[JobReturn]:
        """In the job: run its grid points (lrsweep.sweep.worker.run_pack), one row each; ``peers``:
        its siblings' points it may take over."""
        from hydra.core.utils import setup_globals

        from lrsweep.pack import Pack
        from lrsweep.sweep import worker

        Singleton.set_state(singleton_state)
        setup_globals()
        self._pack = Pack(len(points), worker.launch_folder(points[0], since), reuse=True)
        return worker.run_pack(self, self._pack, points, since, peers)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """On USR2 in the job: save the running point's attempt, then let submitit requeue the job
        (which skips the points whose row was written since the launch)."""
        pack, self._pack = getattr(self, "_pack", None), None  # the requeued copy starts without it
        if pack is not None and pack.attempt is not None:
            pack.attempt.save("USR2: preempted or near the time limit")
        return super().checkpoint(*args, **kwargs)


class LocalLauncher(SweepLauncher):
    _EXECUTOR = "local"


class SlurmLauncher(SweepLauncher):
    _EXECUTOR = "slurm"


def _config_error(e: BaseException) -> bool:
    """Whether ``e`` is lrsweep's ConfigError (imported only once lrsweep's app runs)."""
    errors = sys.modules.get("lrsweep.errors")
    return errors is not None and isinstance(e, errors.ConfigError)


def _remove(file: Path, dirs: list[Path]) -> None:
    """Remove ``file`` and then the directories ``dirs`` (innermost first) that are left empty."""
    file.unlink(missing_ok=True)
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


class GridSweeper(Sweeper):
    """The cartesian product of the command line's sweeps (``a=1,2 b=range(3)``), launched in batches
    of ``max_batch_size`` (all at once by default); a failed point's JobReturn raises its error after
    its batch, as Hydra's basic sweeper does."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        self.max_batch_size, self.params = max_batch_size, dict(params or {})
        self.config: Any = None
        self.hydra_context: Any = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def grid(self, arguments: list[str]) -> list[list[str]]:
        """Every point's overrides, in Hydra's order (the last sweep varies fastest)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        axes: dict[str, list[str]] = {}
        for o in parser.parse_overrides([*(f"{k}={v}" for k, v in self.params.items()), *arguments]):
            key = o.get_key_element()
            if o.is_sweep_override():
                if not o.is_discrete_sweep():
                    raise HydraException(f"{type(self).__name__} does not support sweep type : {o.value_type.name}")
                axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            else:
                axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        return [list(point) for point in itertools.product(*axes.values())]

    def sweep(self, arguments: list[str]) -> Any:
        points = self.grid(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        made = [d for d in (sweep_dir, *sweep_dir.parents) if not d.exists()]  # what a refused sweep removes
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        except OSError as e:  # a full disk: named in the one line the app prints
            (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(sweep_dir / "multirun.yaml")) from None
        size = self.max_batch_size if self.max_batch_size not in (None, -1) else max(1, len(points))
        returns = []
        for start in range(0, len(points), size):
            batch = points[start:start + size]
            if not isinstance(self.launcher, SweepLauncher):  # lrsweep's launchers compose and check each point
                self.validate_batch_is_legal(batch)
            try:
                results = self.launcher.launch(batch, initial_job_idx=start)
            except Exception as e:
                if start == 0 and isinstance(self.launcher, SweepLauncher) and _config_error(e):
                    _remove(sweep_dir / "multirun.yaml", made)  # refused before any job: nothing left behind
                raise
            failed = [r for r in results if r.status == JobStatus.FAILED]
            if failed and isinstance(self.launcher, SweepLauncher):
                # lrsweep's summary has named the failed points (and a full disk): exit 1 without the
                # line of all of a point's overrides that JobReturn.return_value logs before raising
                from lrsweep.job import PointFailed

                raise PointFailed(f"{len(failed)} of {len(results)} grid points failed")
            for r in results:
                _ = r.return_value  # raises the error of a failed point
            returns.append(results)
        return returns
