"""Hydra launchers for lrsweep sweeps: hydra-submitit-launcher's, adapted to lrsweep.sweep.

Hydra imports every module under hydra_plugins/ for every Hydra app in the environment, so
this one imports nothing heavy (no torch, no lrsweep, no submitit: they load when a sweep
launches, as upstream's launcher does; Hydra's basic sweeper is a core plugin, loaded anyway) and no ``from __future__ import annotations`` (Hydra's
scan executes the module before it is in sys.modules, where dataclasses look string
annotations up). The parameter mapping (launcher config -> submitit executor) is upstream's:
:meth:`SweepLauncher.executor` runs upstream's ``launch`` up to its submission. Planning,
skipping, packing, dead-job rows and manifests are in :mod:`lrsweep.sweep`.
"""

import gc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher


@dataclass
class LrsweepLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.lrsweep_launcher.launcher.LocalLauncher"
    parallelism: int = 2  # jobs running at once (size to the machine's cores / cpus_per_task)
    # grid points per job: an int, or auto (the points sharing model, data and calibration in `parallelism` jobs)
    points_per_job: Any = 1
    # submitit sends USR2 30 s before timeout_min; a timed-out point then fails (it would time out again
    # if rerun from scratch), a preempted one (USR2 before that, e.g. job._interrupt()) is requeued
    max_num_timeout: int = 0


@dataclass
class LrsweepSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.lrsweep_launcher.launcher.SlurmLauncher"
    points_per_job: Any = 1  # an int, or auto: the points sharing model, data and calibration in array_parallelism jobs
    wait: bool = True  # false: submit the array, print job ids and return (detached sweep)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LrsweepSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.lrsweep_launcher.launcher.GridSweeper"


ConfigStore.instance().store(group="hydra/launcher", name="lrsweep_local", node=LrsweepLocalConf, provider="lrsweep")
ConfigStore.instance().store(group="hydra/launcher", name="lrsweep_slurm", node=LrsweepSlurmConf, provider="lrsweep")
ConfigStore.instance().store(group="hydra/sweeper", name="lrsweep", node=LrsweepSweeperConf, provider="lrsweep")

# launcher keys that are lrsweep's, not submitit's
OWN_KEYS = ("parallelism", "points_per_job", "wait", "extra")


class _Built(Exception):
    """Stops upstream's launch at its submission, carrying the executor it built."""

    def __init__(self, executor: Any):
        super().__init__("executor built")
        self.executor = executor


class SweepLauncher(BaseSubmititLauncher):
    """Hydra's side of a sweep: lrsweep.sweep plans and runs it, this class talks to Hydra and submitit."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from lrsweep import sweep

        gc.freeze()  # the CLI's modules (torch & co.) are imported: Python's full collections skip their objects
        return sweep.launch(self, job_overrides, initial_job_idx)

    def executor(self, job_overrides: Sequence[Sequence[str]], per_job_points: int = 1) -> Any:
        """The submitit executor upstream's ``launch`` builds from this launcher's parameters
        (``timeout_min`` is per grid point: a job of N points gets N times it).

        Upstream maps the parameters and submits in one method; it is run here with its
        ``map_array`` stopped, so the mapping stays upstream's (it logs the sweep dir and points).
        Its copy of Hydra's state for every point (``Singleton.get_state``, ~8 ms each: 8 s for
        1,000 points) is skipped too: what it builds is dropped, the jobs get lrsweep's one copy."""
        import submitit

        def stop(executor: Any, *args: Any, **kwargs: Any) -> None:
            raise _Built(executor)

        own = {k: self.params.pop(k) for k in OWN_KEYS if k in self.params}
        own["timeout_min"] = self.params["timeout_min"]
        self.params["timeout_min"] = int(own["timeout_min"]) * per_job_points
        real, state = submitit.AutoExecutor.map_array, Singleton.__dict__["get_state"]
        submitit.AutoExecutor.map_array = stop  # type: ignore[method-assign]
        Singleton.get_state = staticmethod(lambda: None)  # type: ignore[method-assign]
        try:
            BaseSubmititLauncher.launch(self, job_overrides, 0)
        except _Built as built:
            return built.executor
        finally:
            submitit.AutoExecutor.map_array = real  # type: ignore[method-assign]
            Singleton.get_state = state  # type: ignore[method-assign]
            self.params.update(own)
        raise RuntimeError("hydra-submitit-launcher's launch() did not submit")

    def __call__(self, pack: List[Any], singleton_state: Dict[Any, Any], since: str,  # type: ignore[override]
                 peers: Any = None) -> List[JobReturn]:
        """In the job: run its grid points (lrsweep.sweep.run_pack), one row each; ``peers``: its
        siblings' points it may take over (lrsweep.sweep.share_points)."""
        from lrsweep import sweep

        Singleton.set_state(singleton_state)
        return sweep.run_pack(self, pack, since, peers)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """On USR2 in the job: save the running point's stage, then let submitit requeue the job
        (which skips the points whose row was written since the launch)."""
        from lrsweep import checkpoint

        checkpoint.save("USR2: preempted or near the time limit")
        return super().checkpoint(*args, **kwargs)


class GridSweeper(BasicSweeper):
    """Hydra's basic sweeper (the same grid, batches and overrides) that leaves composing every point
    before the launch to lrsweep's launchers, which compose and validate each point once
    (lrsweep.sweep.plan: a point that does not compose fails the sweep before anything runs, as
    in Hydra's own check); with any other launcher it checks the batch as Hydra does."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if not isinstance(self.launcher, SweepLauncher):
            super().validate_batch_is_legal(batch)


class LocalLauncher(SweepLauncher):
    _EXECUTOR = "local"


class SlurmLauncher(SweepLauncher):
    _EXECUTOR = "slurm"
