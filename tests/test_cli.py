"""``lrsweep.cli.main`` in-process (conftest.py's ``cli`` fixture: ``sys.argv`` set as the shell
would): the exit code and the one line a refused command prints, and a dry run. The same through a
real ``python -m lrsweep``: test_validation.py (a few cases, default run) and the e2e tier
(test_sweep.py, test_heal.py)."""

from __future__ import annotations

import sys

from conftest import FAST, PLUGINS

LAYER0 = r"model.targets=encoder\.layer\.0\.attention\.self\.query"


def test_a_swept_group_key_is_one_line_naming_plus_plus(cli, tmp_path):
    code, _, err = cli("-m", *FAST, "heal=distill,dsee", "heal.steps=5")
    assert code == 2 and err.startswith("lrsweep: config error: heal.steps: belongs to the config group 'heal'")
    assert "++heal.steps=5" in err and err.count("\n") == 1
    assert not (tmp_path / "results" / "rows").exists()


def test_an_unknown_option_is_one_line_with_did_you_mean(cli):
    code, _, err = cli("method=lplrr", *FAST)
    assert code == 2 and err.startswith("lrsweep: config error: method: 'lplrr' is unknown") and "lplr" in err


def test_dry_run_lists_points_writes_nothing_and_exits_0(cli, tmp_path):
    code, out, _ = cli("-m", "method=svd,lplr", "rank=4,8", "dry_run=true", *FAST, LAYER0)
    assert code == 0 and "8 missing" in out and "nothing was launched" in out  # lplr at seeds 0, 1, 2
    assert "method=lplr rank=8 dry_run=True" in out and out.count(" seed=2") == 2
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))
    assert not any(a.startswith("hydra.sweep.dir=") for a in sys.argv[:-1])  # argv restored by monkeypatch


def test_dry_run_with_a_bad_point_exits_2(cli):
    code, _, err = cli("-m", "rank=4,-3", "dry_run=true", *FAST, LAYER0)
    assert code == 2 and err.startswith("lrsweep: config error: sweep: 1 of 2 grid points are invalid, nothing was "
                                        "launched:\n  point #1 (rank=-3 ")  # one line per bad point
    assert err.rstrip().endswith("rank: -3 must be a positive integer")


def test_a_sweep_through_hydras_launcher_with_its_jobs_in_this_process(cli, monkeypatch, tmp_path, in_process_jobs):
    """The launcher end to end, each job run in this process instead of a submitit one: the executor
    built from the launcher's parameters (hydra-submitit-launcher's mapping), the job side
    (SweepLauncher.__call__ -> lrsweep.sweep.worker.run_pack) runs the packed points through Hydra's
    run_job, one row each. Real local and SLURM jobs: test_sweep.py, test_slurm.py (e2e)."""
    import submitit
    from hydra.core.singleton import Singleton

    from lrsweep.row import read_rows

    executors = in_process_jobs

    copies, real_state = [], Singleton.get_state
    monkeypatch.setattr(Singleton, "get_state", staticmethod(lambda: (copies.append(1), real_state())[1]))
    counting = Singleton.__dict__["get_state"]
    monkeypatch.syspath_prepend(str(PLUGINS))  # fails_above: svd, raising above rank 8
    code, out, err = cli("-m", "method=svd", "method._target_=lrsweep_testplugins.fails_above", "rank=4,16,8",
                         "hydra.launcher.points_per_job=2", "hydra.launcher.timeout_min=7", *FAST, LAYER0)
    assert code == 1, out + err  # a failed point
    (executor,) = executors
    assert isinstance(executor, submitit.AutoExecutor) and executor.cluster == "local"
    assert executor._executor.parameters["timeout_min"] == 14  # per point, times the points of a job
    # Hydra's state copied once for the jobs, not once a point; no library attribute swapped
    assert copies == [1] and Singleton.__dict__["get_state"] is counting
    rows = {r.rank: r for r in read_rows(tmp_path / "results")}
    assert rows[4].status == rows[8].status == "ok" and rows[16].status == "failed"
    assert "injected failure" in rows[16].error["message"]
    assert [rows[r].extra["packed"]["point"] for r in (4, 16, 8)] == [1, 2, 1]  # jobs of 2 and 1 points
    assert "2 ok, 1 failed, 0 skipped" in out and f"[lrsweep] failed {rows[16].run_id}" in out


def test_a_single_run_and_its_dry_run(cli, tmp_path):
    from lrsweep.row import read_rows

    code, out, _ = cli("method=svd", "rank=4", "dry_run=true", *FAST, LAYER0)
    assert code == 0 and "1 missing" in out and not list(read_rows(tmp_path / "results"))
    code, out, err = cli("method=svd", "rank=4", *FAST, LAYER0)
    (row,) = read_rows(tmp_path / "results")
    assert code == 0 and row.status == "ok" and row.rank == 4, out + err
