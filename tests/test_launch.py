"""lrsweep.sweep.launch with a fake launcher and executor: planning, skipping, packing, dead-job
rows, dry runs and the summary, in-process and in milliseconds per job.

The fake executor's jobs (fakelaunch.py, run by conftest.py's ``launch`` fixture) write the rows a
real job would write (or die without one); the launcher's side (lrsweep.sweep) is the real code.
test_sweep.py and test_faults.py launch real local jobs through the CLI for what only a real process
shows (submitit, Hydra's job dirs, signals, the exit code)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from conftest import FAST
from fakelaunch import BLOCK0, FakeLauncher
from lrsweep import sweep
from lrsweep.sweep import submit
from lrsweep.errors import ConfigError
from lrsweep.row import read_rows


def test_every_point_runs_then_a_rerun_skips_every_ok_point(launch, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, "lrsweep.sweep")
    launcher, rets = launch({"rank": [4, 8, 16]})
    assert [r.status.name for r in rets] == ["COMPLETED"] * 3 and len(launcher._fake.jobs) == 3
    assert sweep.report(launcher.outcome) == 0
    assert "3 ok, 0 failed, 0 skipped" in capsys.readouterr().out
    rows = {r.rank: r for r in read_rows(tmp_path)}
    assert sorted(rows) == [4, 8, 16] and all(r.status == "ok" for r in rows.values())
    before = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "rows").glob("*.json")}

    launcher, rets = launch({"rank": [4, 8, 16]})
    assert launcher.executors == 0  # nothing submitted; every point's JobReturn, from its ok row
    assert [r.status.name for r in rets] == ["COMPLETED"] * 3 and [r.overrides for r in rets] == [
        [f"rank={k}"] for k in (4, 8, 16)]
    assert "3 grid points: 0 to run, 3 already ok" in caplog.text
    assert sweep.report(launcher.outcome) == 0 and "0 ok, 0 failed, 3 skipped" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in (tmp_path / "rows").glob("*.json")} == before


def test_points_pack_into_jobs_and_a_dead_job_fails_only_its_points_without_a_row(launch, tmp_path, capsys, caplog):
    """Four points, two per job; the second job dies after its first point's row: that row stays ok,
    the other point gets the launcher's failed row with submitit's message, and the rerun runs only it."""
    launcher, rets = launch({"rank": [4, 8, 16, 32]}, points_per_job=2, die_at={32}, rows_before_death=1)
    assert [[p.cfg.rank for p in j.points] for j in launcher._fake.jobs] == [[4, 8], [16, 32]]  # grid order
    assert [r.status.name for r in rets] == ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED"]
    rows = {r.rank: r for r in read_rows(tmp_path)}
    assert [rows[k].status for k in (4, 8, 16)] == ["ok"] * 3
    dead = rows[32]
    assert dead.status == "failed" and dead.extra["job_state"] == "FAILED" and dead.error["type"] == "RuntimeError"
    assert dead.error["message"].startswith("job 1 ended without a row "
                                            "(state FAILED; killed, out of memory or crashed)")
    assert "has not produced any output" in dead.error["message"] and "killed" in dead.error["traceback"]
    assert dead.log_path == "/dev/null" and dead.slurm_job_id is None and dead.method == "svd"
    assert sweep.report(launcher.outcome) == 1
    out = capsys.readouterr().out
    assert "3 ok, 1 failed, 0 skipped" in out and f"[lrsweep] failed {dead.run_id}" in out

    caplog.set_level(logging.INFO, "lrsweep.sweep")
    launcher, rets = launch({"rank": [4, 8, 16, 32]}, points_per_job=2)  # the fault is gone
    assert "4 grid points: 1 to run, 3 already ok" in caplog.text
    assert [[p.cfg.rank for p in j.points] for j in launcher._fake.jobs] == [[32]]
    assert sweep.report(launcher.outcome) == 0 and "1 ok, 0 failed, 3 skipped" in capsys.readouterr().out


def test_auto_packs_points_that_share_the_dense_model_into_parallelism_jobs(launch):
    launcher, _ = launch({"seed": [0, 1], "rank": [4, 8, 16]}, points_per_job="auto", parallelism=2)
    jobs = [[(p.cfg.seed, p.cfg.rank) for p in j.points] for j in launcher._fake.jobs]
    assert jobs == [[(0, 4), (0, 16)], [(0, 8)], [(1, 4), (1, 16)], [(1, 8)]]  # seeds never share a job; dealt


def test_same_experiment_twice_in_a_grid_runs_once(launch):
    launcher, rets = launch({"rank": [4, 4]})
    assert len(launcher._fake.jobs) == 1 and len(rets) == 1


@pytest.mark.parametrize("value", [0, -1, "many", True, 1.5])
def test_bad_points_per_job_is_a_config_error_before_anything(launch, tmp_path, value):
    with pytest.raises(ConfigError, match=r"hydra.launcher.points_per_job: .* is not a positive integer or auto"):
        launch({"rank": [4, 8]}, points_per_job=value)
    assert not (tmp_path / "rows").exists()


def test_one_bad_point_launches_nothing_even_in_a_dry_run(launch, tmp_path, capsys):
    for dry in ("false", "true"):
        with pytest.raises(ConfigError) as e:
            launch({"rank": [4, -3, 8]}, f"dry_run={dry}")
        assert str(e.value).startswith("sweep: 1 of 3 grid points are invalid, nothing was launched:")
        assert "point #1 (rank=-3): rank: -3 must be a positive integer" in str(e.value)
        assert "dry run" not in capsys.readouterr().out and not (tmp_path / "rows").exists()


def test_dry_run_lists_every_point_and_submits_nothing(launch, tmp_path, capsys):
    launch({"rank": [4]})
    capsys.readouterr()
    launcher, rets = launch({"rank": [4, 8]}, "dry_run=true")
    assert rets == [] and launcher.executors == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [(ln[2], ln[3], ln[4]) for ln in lines] == [("ok", "1.0", "rank=4"), ("missing", "1.0", "rank=8")]
    assert "1 ok, 1 missing; to run: about 1 s of job time; nothing was launched" in out
    assert len(list(read_rows(tmp_path))) == 1 and sweep.report(launcher.outcome) == 0


def test_slurm_without_sbatch_on_path_is_one_clear_error_before_submitting(launch, tmp_path, monkeypatch):
    monkeypatch.setattr(FakeLauncher, "_EXECUTOR", "slurm")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="sbatch/sinfo are not on PATH") as e:
        launch({"rank": [8]})
    assert e.value.key == "hydra/launcher" and "hydra/launcher=local" in str(e.value)
    assert not (tmp_path / "rows").exists()


# ---------------------------------------------------------------- SLURM preflight against a fake sinfo
SINFO = """#!/bin/sh
# a fake sinfo -h -o %P|%G: a default CPU partition and a GPU one
[ -n "$SINFO_FAIL" ] && { echo "slurm_load_partitions: Unable to contact slurm controller" >&2; exit 1; }
printf 'debug*|(null)\\ngpu|gpu:2\\n'
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sinfo", SINFO), ("sbatch", "#!/bin/sh\nexit 1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(FakeLauncher, "_EXECUTOR", "slurm")


@pytest.mark.parametrize("params, overrides, key, message", [
    ({"partition": "gpu_big"}, [], "hydra.launcher.partition",
     "'gpu_big' is not a partition of this cluster; did you mean 'gpu'? (valid: debug, gpu)"),
    ({"gpus_per_node": 1}, [], "hydra.launcher.gpus_per_node",
     "1 GPU(s) per node requested but partition 'debug' has no GPUs"),
    ({}, ["device=cuda"], "device", "'cuda' but the jobs ask for no GPU (hydra.launcher.gpus_per_node=0)"),
])
def test_bad_cluster_input_is_one_clear_error_before_submitting(fake_slurm, launch, tmp_path, params, overrides,
                                                                key, message):
    """The real-cluster version of one case is in test_slurm.py (it also checks sacct: nothing submitted)."""
    with pytest.raises(ConfigError) as e:
        launch({"rank": [8]}, *overrides, **params)
    assert e.value.key == key and message in str(e.value), str(e.value)
    assert not (tmp_path / "rows").exists() and not (tmp_path / "sweeps").exists()


def test_slurm_array_writes_its_manifest_and_a_detached_sweep_returns_at_submission(fake_slurm, launch, tmp_path,
                                                                                     capsys):
    """One array and its manifest (what lrsweep.status reads); with wait=false the sweep returns once
    submitted and says so. Against the real cluster: test_slurm.py (e2e)."""
    from lrsweep.status import read_manifests

    for name in ("squeue", "sacct"):  # no job of this cluster is queued or known
        (tmp_path / "bin" / name).write_text("#!/bin/sh\n")
        (tmp_path / "bin" / name).chmod(0o755)
    launcher, rets = launch({"rank": [4, 8]}, wait=False)
    assert rets == [] and sweep.report(launcher.outcome) == 0
    out = capsys.readouterr().out
    (manifest,) = read_manifests(tmp_path)
    array = manifest["array_job_id"]
    assert [p["job_id"] for p in manifest["points"]] == [f"{array}_0", f"{array}_1"]
    assert f"[lrsweep] detached: 2 jobs submitted ({array}_0, {array}_1) for 2 points, 0 already ok" in out
    assert f"[lrsweep] progress: python -m lrsweep.status {tmp_path}" in out
    assert [p["overrides"] for p in manifest["points"]] == [["rank=4"], ["rank=8"]]
    launcher, rets = launch({"rank": [4, 8, 16]})  # waited for this time; 4 and 8 are ok by now
    assert [r.status.name for r in rets] == ["COMPLETED"] * 3 and len(read_manifests(tmp_path)) == 2


def test_gpu_partition_passes_preflight(fake_slurm):
    submit.preflight({"partition": "gpu", "gpus_per_node": 1})
    submit.preflight({"partition": "debug,gpu"})


def test_unreachable_controller_is_one_clear_error(fake_slurm, monkeypatch):
    monkeypatch.setenv("SINFO_FAIL", "1")
    with pytest.raises(ConfigError, match="sinfo failed, the SLURM controller is not reachable: "
                                          "slurm_load_partitions: Unable to contact"):
        submit.preflight({})


def test_plan_keys_device_auto_by_the_device_its_jobs_get(compose, monkeypatch, tmp_path):
    """Planned here (no GPU), a point with device=auto has the run_id of the device type its jobs see:
    cuda on GPU nodes of SLURM, cpu in local jobs that request no GPU (lrsweep.sweep.auto_device)."""
    from lrsweep.identity import run_id

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = [*FAST, BLOCK0, f"results_dir={tmp_path}"]
    for executor, params, device in (("slurm", {"gpus_per_node": 1}, "cuda"), ("local", {}, "cpu")):
        launcher = FakeLauncher(compose, base, **params)
        launcher._EXECUTOR = executor
        [point] = sweep.plan(launcher, [["rank=4"]], 0)
        assert point.run_id == run_id(compose([*base, "rank=4", f"device={device}"])), executor


def test_points_that_differ_only_in_their_seed_are_checked_once_and_each_seed_alone(launch, monkeypatch):
    """lrsweep.validate.validate_experiment (everything but the seed) runs once for a seed grid's points
    of one config; a bad seed among them fails that point only, the others' checks are unchanged."""
    from lrsweep import validate

    calls = []
    real = validate.validate_experiment
    monkeypatch.setattr(validate, "validate_experiment", lambda cfg, **kw: calls.append(cfg.rank) or real(cfg, **kw))
    launch({"rank": [4, 8], "seed": [0, 1, 2]}, "dry_run=true")
    assert sorted(calls) == [4, 8]
    with pytest.raises(ConfigError) as e:
        launch({"rank": [4, 400], "seed": [0, "x"]}, "dry_run=true")
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 3 and "(rank=4 seed=x): seed: 'x' is not an integer" in lines[0]
    assert "(rank=400 seed=0): rank" in lines[1] and "(rank=400 seed=x): seed" in lines[2]
