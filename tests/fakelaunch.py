"""A fake of what lrsweep.sweep.launch talks to: the Hydra launcher (hydra_plugins/lrsweep_launcher)
and the submitit executor and its jobs. The fake jobs write the rows a real job would write (or die
without one); the launcher's side (lrsweep.sweep) is the real code. conftest.py's ``launch`` fixture
runs a sweep with them (test_launch.py, test_sweep_faults.py, test_damaged.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from conftest import CONF
from lrsweep import sweep
from lrsweep.row import ResultRow, now, write_row
from lrsweep.sweep import returns

BLOCK0 = r"model.targets=encoder\.layer\.0\.attention\.self\.query"


@dataclass
class FakeJob:
    """A finished job: its points' rows were written, or it died (``dies``) after writing ``rows_before_death``."""

    job_id: str
    points: list[sweep.Point]
    since: str
    dies: bool = False
    rows_before_death: int = 0
    state: str = "FAILED"
    paths: Any = field(default_factory=lambda: SimpleNamespace(stdout="/dev/null"))

    def __post_init__(self):
        for p in self.points[:self.rows_before_death if self.dies else None]:
            write_row(p.results_dir, ResultRow(run_id=p.run_id, status="ok", rank=p.cfg.rank,
                                               method=str(p.cfg.method.name), model=str(p.cfg.model.name),
                                               finished_at=now(), wall_seconds=1.0, bits_per_weight=4.0,
                                               accuracy=0.5))

    def done(self) -> bool:
        return True

    def results(self):
        if self.dies:
            raise RuntimeError(f"Job {self.job_id} has not produced any output (state: {self.state})")
        return [[returns.job_return(p, returns.row_of(p), self.job_id) for p in self.points]]

    def stderr(self) -> str:
        return "killed\n"


ARRAY_IDS = itertools.count(100)


class FakeExecutor:
    def __init__(self, die_at: set[int], rows_before_death: int):
        self.die_at, self.rows_before_death, self.jobs = die_at, rows_before_death, []

    def submit(self, launcher, points, singleton_state, since, peers=None) -> FakeJob:
        dies = any(p.cfg.rank in self.die_at for p in points)
        job = FakeJob(str(len(self.jobs)), points, since, dies, self.rows_before_death)
        self.jobs.append(job)
        return job

    def map_array(self, launcher, packs, states, sinces, peers) -> list[FakeJob]:  # SLURM: an array, a task per job
        jobs = [self.submit(launcher, pts, state, since)
                for pts, state, since in zip(packs, states, sinces, strict=True)]
        array = next(ARRAY_IDS)  # as SLURM: every array its own id (two sweeps may share a second)
        for i, job in enumerate(jobs):
            job.job_id = f"{array}_{i}"
        return jobs


class FakeLauncher:
    """What lrsweep.sweep.launch uses of the Hydra launcher (hydra_plugins/lrsweep_launcher)."""

    _EXECUTOR = "local"

    def __init__(self, compose, base: list[str], die_at=(), rows_before_death=0, **params):
        self.config = compose(base, hydra_cfg=True)
        self.hydra_context = SimpleNamespace(config_loader=SimpleNamespace(
            load_sweep_config=lambda config, ov: compose([*base, *ov], hydra_cfg=True),
            list_groups=lambda parent: [d.name for d in (CONF / parent).glob("*/")]))
        self.params = {"parallelism": 2, "points_per_job": 1, "cpus_per_task": 1, "wait": True,
                       "submitit_folder": str(Path(str(self.config.results_dir)) / ".submitit" / "%j"), **params}
        self._fake = FakeExecutor(set(die_at), rows_before_death)
        self.executors = 0

    def executor(self, per_job_points: int = 1) -> FakeExecutor:
        self.executors += 1
        return self._fake
