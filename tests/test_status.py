"""``python -m lrsweep.status`` in-process: rows, sweep manifests and the SLURM states that fake
``squeue`` / ``sacct`` report. The same against a real cluster, a detached sweep included:
test_slurm.py::test_detached_sweep_status_and_resubmit (e2e)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from lrsweep import status
from lrsweep.row import ResultRow, now, write_row

ARGV = ["lrsweep", "-m", "rank=4,8,16,32,64", "hydra/launcher=slurm", "hydra.launcher.wait=true"]
# run_id -> (job id, what squeue / sacct say of that job, the row written so far)
POINTS = {"r_ok": ("100_0", "sacct COMPLETED", "ok"), "r_failed": ("100_1", "sacct FAILED", "failed"),
          "r_running": ("100_2", "squeue RUNNING", None), "r_pending": ("100_3", "squeue PENDING", None),
          "r_oom": ("100_4", "sacct OUT_OF_MEMORY", None)}


def _row(run_id: str, state: str) -> ResultRow:
    row = ResultRow(run_id=run_id, status=state, rank=4, method="svd", model="minilm", finished_at=now(),
                    wall_seconds=1.0, run_name=f"name-{run_id}", slurm_job_id=POINTS[run_id][0])
    if state == "failed":
        row.error = {"type": "RuntimeError", "message": "injected failure\nsecond line", "traceback": ""}
    return row


@pytest.fixture
def swept(tmp_path, monkeypatch):
    """A results dir with one submitted array of five points (manifest and rows) and fake squeue/sacct."""
    results = tmp_path / "results"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ARGV)
    status.write_manifest(results, "sweep-a", "100", str(tmp_path / ".submitit"),
                          [{"index": i, "run_id": rid, "job_id": job, "overrides": [f"rank={4 << i}"]}
                           for i, (rid, (job, _, _)) in enumerate(POINTS.items())])
    for rid, (_, _, state) in POINTS.items():
        if state:
            write_row(results, _row(rid, state))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "sacct"):
        lines = "".join(f"{job}|{s.split()[1]}\n" for job, s, _ in POINTS.values() if s.startswith(tool))
        (bin_dir / tool).write_text(f"#!/bin/sh\necho \"$@\" >> {bin_dir}/{tool}.calls\nprintf '{lines}'\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return results, bin_dir


def test_status_of_every_point_and_the_command_that_resubmits(swept, tmp_path, capsys):
    results, bin_dir = swept
    assert status.main([str(results)]) == 1
    out = capsys.readouterr().out
    assert f"{results}: 5 grid points in 1 submitted sweeps" in out
    assert "failed   r_failed job 100_1 [FAILED] name-r_failed: RuntimeError: injected failure\n" in out
    assert "running  r_running job 100_2 [RUNNING] rank=16" in out
    assert "pending  r_pending job 100_3 [PENDING] rank=32" in out
    assert "missing  r_oom job 100_4 [OUT_OF_MEMORY] rank=64" in out
    assert "r_ok" not in out  # ok points are counted, not listed
    assert "ok 1, failed 1, missing 3 (pending 1, running 1)" in out
    detached = " ".join([sys.executable, "-m", "lrsweep", *ARGV[1:-1], "hydra.launcher.wait=false"])
    assert f"resubmit failed/missing: cd {tmp_path} && {detached}" in out
    # squeue for the live jobs, then sacct once for the array of the others
    assert (bin_dir / "sacct.calls").read_text().split()[-1] == "100"


def test_json_lines_and_no_slurm(swept, capsys):
    results, bin_dir = swept
    status.main([str(results), "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {p["run_id"]: (p["status"], p["slurm_state"]) for p in lines} == {
        "r_ok": ("ok", "COMPLETED"), "r_failed": ("failed", "FAILED"), "r_running": ("running", "RUNNING"),
        "r_pending": ("pending", "PENDING"), "r_oom": ("missing", "OUT_OF_MEMORY")}
    (bin_dir / "squeue.calls").unlink()
    assert status.main([str(results), "--no-slurm", "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["status"] for p in lines].count("missing") == 3 and not (bin_dir / "squeue.calls").exists()


def test_active_points_are_the_queued_or_running_ones(swept):
    results, _ = swept
    assert status.active_run_ids(results) == {"r_running": "100_2", "r_pending": "100_3"}


def test_resubmit_runs_the_sweeps_own_command_detached(swept, tmp_path, monkeypatch, capsys):
    results, _ = swept
    ran = []
    monkeypatch.setattr(status.subprocess, "run", lambda cmd, cwd, check: ran.append((cmd, cwd)))
    status.main([str(results), "--resubmit", "--no-slurm"])
    assert ran == [([sys.executable, "-m", "lrsweep", *ARGV[1:-1], "hydra.launcher.wait=false"], str(tmp_path))]
    assert "[lrsweep.status] resubmitting: cd" in capsys.readouterr().out


def test_all_ok_exits_0(tmp_path, capsys):
    write_row(tmp_path, _row("r_ok", "ok"))
    assert status.main([str(tmp_path), "--no-slurm"]) == 0
    assert "ok 1, failed 0, missing 0" in capsys.readouterr().out
    assert status.main([str(tmp_path / "empty"), "--no-slurm"]) == 1  # no known point is not "all ok"
