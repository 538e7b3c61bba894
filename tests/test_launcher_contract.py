"""Hydra's launcher contract for lrsweep's app, through Hydra's own sweep runner (hydra.test_utils'
SweepTaskFunction, which runs ``Hydra.multirun`` and keeps the sweeper's returns) and its output
check (``verify_dir_outputs``): one JobReturn per point in grid order, each as Hydra's run_job builds
it; sweep dir and subdir overrides from the command line; the launcher's bookkeeping never among
the user's overrides. Hydra's LauncherTestSuite itself runs a foreign app (hydra.test_utils.a_module),
which lrsweep's launchers refuse by design (last test). Jobs run in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.test_utils.test_utils import SweepTaskFunction, verify_dir_outputs
from omegaconf import OmegaConf

from conftest import CONF, FAST, REPO
from lrsweep import cli

LAYER0 = r"model.targets=encoder\.layer\.0\.attention\.self\.query"


@pytest.fixture
def sweep_runner(monkeypatch, tmp_path, in_process_jobs):
    """sweep_runner(*overrides) -> Hydra's returns of lrsweep's app, its jobs run in this process."""
    monkeypatch.setenv("LRSWEEP_THREADS", "")

    def run(*overrides: str, sweep_dir: Path | None = None):
        runner = SweepTaskFunction()
        runner.calling_file, runner.calling_module = cli.__file__, None
        runner.task_function = cli._task.__wrapped__
        runner.config_path, runner.config_name = str(CONF), "config"
        runner.overrides = [*FAST, LAYER0, "logger=none", f"results_dir={tmp_path / 'results'}", *overrides]
        runner.temp_dir = str(sweep_dir or tmp_path / "sweep")
        GlobalHydra.instance().clear()
        return runner.__enter__().returns  # its __exit__ would remove the sweep dir the tests look into

    return run


def test_returns_in_grid_order_as_hydras_run_job_builds_them(sweep_runner, tmp_path):
    """Packed with auto, the jobs hold points 0+2 and 1+3 (dealt): the returns still come in grid order,
    with the user's overrides verbatim (a value with a space stays one override)."""
    (returns,) = sweep_runner("method=svd", "rank=4,8", "seed=0,1", "+note='a b'",
                              "hydra.launcher.points_per_job=auto", "hydra.job.chdir=true")
    grid = [[f"rank={r}", f"seed={s}", "+note='a b'"] for r in (4, 8) for s in (0, 1)]
    assert [[o for o in r.overrides if o.split("=")[0] in ("rank", "seed", "+note")] for r in returns] == grid
    for i, ret in enumerate(returns):
        assert ret.status.name == "COMPLETED" and ret.return_value == "ok"
        assert ret.cfg.rank == (4, 4, 8, 8)[i] and ret.cfg.note == "a b" and "hydra" not in ret.cfg
        assert ret.hydra_cfg.hydra.job.num == i and ret.hydra_cfg.hydra.job.id in ("in-process", "0", "1")
        assert ret.working_dir == str(tmp_path / "sweep" / str(i))
        verify_dir_outputs(ret, ret.overrides)  # the job's log, .hydra/config.yaml and overrides.yaml
        assert not any(o.startswith("sweep_name") for o in ret.overrides)
        assert "sweep_name" not in ret.hydra_cfg.hydra.job.override_dirname
        assert ret.cfg.sweep_name == "sweep"  # the W&B group and the rows' sweep: set, not overridden


@pytest.mark.parametrize("chdir", [False, True])
def test_a_rerun_returns_every_point_from_its_row(sweep_runner, tmp_path, chdir):
    """Points already ok are not run again; their JobReturns have what run_job would give them (the
    working dir: the job's output dir with hydra.job.chdir, else the current dir)."""
    sweep_runner("method=svd", "rank=4,8", f"hydra.job.chdir={chdir}")
    (returns,) = sweep_runner("method=svd", "rank=4,8", f"hydra.job.chdir={chdir}", sweep_dir=tmp_path / "again")
    assert [r.status.name for r in returns] == ["COMPLETED"] * 2 and [r.cfg.rank for r in returns] == [4, 8]
    assert returns[1].working_dir == (str(tmp_path / "again" / "1") if chdir else os.getcwd())
    assert returns[1].overrides == [o for o in returns[1].overrides if not o.startswith("sweep_name")]


def test_sweep_dir_and_subdir_from_the_command_line(sweep_runner, tmp_path):
    (returns,) = sweep_runner("method=svd", "rank=4,8", "hydra.sweep.subdir=sub_${hydra.job.num}",
                              "hydra.job.chdir=true")
    assert [r.working_dir for r in returns] == [str(tmp_path / "sweep" / f"sub_{i}") for i in (0, 1)]
    for r in returns:
        verify_dir_outputs(r, r.overrides)


APP = """
import hydra

@hydra.main(version_base=None, config_path=None)
def main(cfg):
    print("ran", cfg)

main()
"""


def test_a_foreign_app_is_told_in_one_line_to_use_submitits_launcher(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "app.py", "-m", "hydra/launcher=lrsweep_local", "+x=1,2"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "ran" not in out.stdout
    assert out.stderr.strip() == ("hydra/launcher=lrsweep_local serves lrsweep's app (python -m lrsweep); "
                                  "for this app use hydra/launcher=submitit_local")


def test_composing_the_sweep_dir_is_hydras(sweep_runner, tmp_path):
    """The sweep's multirun.yaml, as Hydra's basic sweeper writes it."""
    sweep_runner("method=svd", "rank=4")
    saved = OmegaConf.load(tmp_path / "sweep" / "multirun.yaml")
    assert "rank=4" in saved.hydra.overrides.task and saved.hydra.sweep.dir == str(tmp_path / "sweep")
