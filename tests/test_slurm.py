"""Sweeps on a real SLURM cluster (bash launchers/local_slurm.sh up): arrays, failure isolation,
requeue on USR2, detached mode + lrsweep.status, and bad launcher input.

Without a reachable cluster these tests skip with the reason; with LRSWEEP_REQUIRE_SLURM=1 (CI)
they fail instead. A test method is injected with ``method._target_``: its module is written
to tmp_path and put on PYTHONPATH, since the SLURM job process cannot import test modules; its
behaviour (raise, die, sleep) is set by environment variables, which are not part of the
experiment config, so a rerun without them is the same grid point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, PLUGINS, REPO, run_cli
from lrsweep.row import read_rows

pytestmark = pytest.mark.e2e  # real jobs on a real cluster: the e2e tier (README, "Tests"), not the default `pytest`

PLUGIN = '''
import os, time
from pathlib import Path
from lrsweep.methods.svd import svd

def flaky(W, *, rank, bits=16, seed=0, stats=None, **opts):
    """svd, but: raise / hard-exit at the ranks named in SLURM_TEST_FAIL; the first attempt at a rank
    sleeps SLURM_TEST_SLEEP per layer (a requeued job does not, unless SLURM_TEST_SLEEP_ALWAYS)."""
    first = True
    if os.environ.get("SLURM_TEST_MARKER"):
        marker = Path(os.environ["SLURM_TEST_MARKER"], f"started-{rank}-{os.environ.get('SLURM_RESTART_COUNT', '0')}")
        first = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
        marker.touch()
    how = os.environ.get("SLURM_TEST_FAIL", "").split(",")
    if f"raise{rank}" in how:
        raise RuntimeError(f"injected failure at rank {rank}")
    if f"die{rank}" in how:
        os._exit(3)
    if first or os.environ.get("SLURM_TEST_SLEEP_ALWAYS"):
        time.sleep(float(os.environ.get("SLURM_TEST_SLEEP", "0")))
    return svd(W, rank=rank, bits=bits, seed=seed, stats=stats, **opts)
'''
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3"]  # 2 jobs side by side
SMALL = [*FAST, "eval.probe_train=64", "eval.probe_test=64", "seeds=1"]  # lplr at one seed


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client on PATH (sinfo/sbatch)"
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is unset (start one with: bash launchers/local_slurm.sh up)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    if not any(s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.split()):
        return f"no usable node (sinfo states: {out.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("LRSWEEP_REQUIRE_SLURM") == "1":
            pytest.fail(f"LRSWEEP_REQUIRE_SLURM=1 but no SLURM cluster is reachable: {problem}")
        pytest.skip(f"no SLURM cluster reachable: {problem}")


@pytest.fixture
def plugin(tmp_path):
    d = tmp_path / "plug"
    d.mkdir()
    (d / "lrsweep_slurm_test_plug.py").write_text(PLUGIN)
    (tmp_path / "marker").mkdir()
    return {"PYTHONPATH": os.pathsep.join([str(d), str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
            "SLURM_TEST_MARKER": str(tmp_path / "marker")}


FLAKY = "method._target_=lrsweep_slurm_test_plug.flaky"


def _out(proc) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def _array_id(stdout: str) -> str:
    m = re.search(r"submitted SLURM array (\d+)", stdout)
    assert m, stdout
    return m.group(1)


def _sacct(job: str, duplicates: bool = False) -> list[tuple[str, str]]:
    """(JobID, State) of the allocations of a job/array, polled until sacct has them all ended."""
    cmd = ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", job] + (["-D"] if duplicates else [])
    lines: list[tuple[str, str]] = []
    for _ in range(30):  # sacct lags squeue by a few seconds
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        lines = [tuple(ln.split("|", 1)) for ln in out.splitlines() if ln.strip()]
        if lines and not any(s in ("PENDING", "RUNNING", "COMPLETING") for _, s in lines):
            break
        time.sleep(1)
    return lines


def _status(results: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrsweep.status", str(results), *extra], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.mark.slurm
def test_array_of_four_ok_rows_then_rerun_skips_all(cluster, tmp_path):
    results = tmp_path / "res"
    proc = run_cli("-m", *SLURM, "method=svd,lplr", "rank=8,16", *SMALL, f"results_dir={results}", cwd=tmp_path)
    assert proc.returncode == 0, _out(proc)
    assert "4 ok, 0 failed, 0 skipped" in proc.stdout, _out(proc)
    array = _array_id(proc.stdout)
    rows = list(read_rows(results))
    assert len(rows) == 4 and all(r.status == "ok" for r in rows)
    assert sorted(r.slurm_job_id for r in rows) == [f"{array}_{i}" for i in range(4)]
    assert sorted(r.slurm_array_index for r in rows) == ["0", "1", "2", "3"]
    for r in rows:
        assert r.log_path and Path(r.log_path).is_file() and r.slurm_job_id in r.log_path
        assert r.device == "cpu"
    acct = _sacct(array)
    assert sorted(acct) == [(f"{array}_{i}", "COMPLETED") for i in range(4)], acct

    st = _status(results)
    assert st.returncode == 0 and "ok 4, failed 0, missing 0" in st.stdout, st.stdout + st.stderr

    again = run_cli("-m", *SLURM, "method=svd,lplr", "rank=8,16", *SMALL, f"results_dir={results}", cwd=tmp_path)
    assert again.returncode == 0, _out(again)
    assert "0 to run, 4 already ok" in again.stdout and "submitted SLURM array" not in again.stdout


@pytest.mark.slurm
def test_failures_are_isolated_and_rerun_submits_only_them(cluster, tmp_path, plugin):
    results = tmp_path / "res"
    args = ["-m", *SLURM, FLAKY, "rank=8,16,32", *SMALL, f"results_dir={results}"]
    proc = run_cli(*args, cwd=tmp_path, env={**plugin, "SLURM_TEST_FAIL": "raise16,die32"})
    assert proc.returncode == 1, _out(proc)
    assert "1 ok, 2 failed, 0 skipped" in proc.stdout, _out(proc)
    rows = {r.rank: r for r in read_rows(results)}
    assert rows[8].status == "ok"
    assert rows[16].status == "failed" and "injected failure at rank 16" in rows[16].error["message"]
    dead = rows[32]  # killed without writing its row: the launcher wrote it, with SLURM's view
    assert dead.status == "failed" and dead.extra["job_state"] == "FAILED", dead.error
    assert dead.slurm_job_id == f"{_array_id(proc.stdout)}_2" and "exit code 3" in dead.error["traceback"]
    assert Path(dead.log_path).is_file()

    rerun = run_cli(*args, cwd=tmp_path, env=plugin)  # the fault is gone
    assert rerun.returncode == 0, _out(rerun)
    assert "2 to run, 1 already ok" in rerun.stdout and "2 ok, 0 failed, 1 skipped" in rerun.stdout, _out(rerun)
    assert len(_sacct(_array_id(rerun.stdout))) == 2
    assert sorted((r.rank, r.status) for r in read_rows(results)) == [(8, "ok"), (16, "ok"), (32, "ok")]


@pytest.mark.slurm
def test_usr2_requeues_the_job_which_ends_with_one_ok_row(cluster, tmp_path, plugin):
    results = tmp_path / "res"
    env = {**os.environ, **plugin, "SLURM_TEST_SLEEP": "0.3"}  # ~11 s of compression (36 layers)
    cmd = [sys.executable, "-m", "lrsweep", "-m", *SLURM, "hydra.launcher.timeout_min=15", FLAKY, "rank=8", *SMALL,
           f"results_dir={results}"]
    log = tmp_path / "sweep.log"
    with (open(log, "w") as out,
          subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT) as sweep):
        marker = Path(plugin["SLURM_TEST_MARKER"]) / "started-8-0"
        for _ in range(240):  # the job is compressing: submitit's USR2 handler is installed
            if marker.exists() or sweep.poll() is not None:
                break
            time.sleep(0.5)
        assert marker.exists(), log.read_text()[-3000:]
        job = _array_id(log.read_text())  # one point: a plain job, not an array
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        sweep.wait(timeout=300)
    stdout = log.read_text()
    assert sweep.returncode == 0, stdout[-4000:]
    assert "1 ok, 0 failed, 0 skipped" in stdout
    rows = list(read_rows(results))
    assert len(rows) == 1 and rows[0].status == "ok"
    assert rows[0].extra["requeues"] == 1 and rows[0].extra["interrupted"][0]["stage"] == "compress"
    assert not (results / "checkpoints" / f"{rows[0].run_id}.json").exists()
    assert (Path(plugin["SLURM_TEST_MARKER"]) / "started-8-1").exists()  # the requeued run
    states = [s for _, s in _sacct(job, duplicates=True)]
    assert states == ["REQUEUED", "COMPLETED"], states


@pytest.mark.slurm
@pytest.mark.slow
def test_time_outs_are_requeued_at_most_max_num_timeout_times(cluster, tmp_path, plugin):
    # with a limit under 10 min, submitit takes every USR2 for a time-out: the first is requeued
    # (max_num_timeout=1), the second ends the job with a failed row
    results = tmp_path / "res"
    env = {**os.environ, **plugin, "SLURM_TEST_SLEEP": "2", "SLURM_TEST_SLEEP_ALWAYS": "1"}
    cmd = [sys.executable, "-m", "lrsweep", "-m", *SLURM, "hydra.launcher.timeout_min=5",
           "hydra.launcher.signal_delay_s=1", "hydra.launcher.max_num_timeout=1", FLAKY, "rank=8", *SMALL,
           f"results_dir={results}"]
    log = tmp_path / "sweep.log"
    with (open(log, "w") as out,
          subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT) as sweep):
        for attempt in (0, 1):
            marker = Path(plugin["SLURM_TEST_MARKER"]) / f"started-8-{attempt}"
            for _ in range(360):
                if marker.exists() or sweep.poll() is not None:
                    break
                time.sleep(0.5)
            assert marker.exists(), log.read_text()[-3000:]
            subprocess.run(["scancel", "--signal=USR2", _array_id(log.read_text())], check=True)
        sweep.wait(timeout=300)
    stdout = log.read_text()
    assert sweep.returncode == 1 and "0 ok, 1 failed, 0 skipped" in stdout, stdout[-4000:]
    (row,) = read_rows(results)
    assert row.status == "failed" and "timed-out too many times" in row.error["message"], row.error
    assert row.extra["requeues"] == 1 and row.extra["interrupted"][0]["stage"] == "compress"
    states = [s for _, s in _sacct(_array_id(stdout), duplicates=True)]
    assert states == ["REQUEUED", "COMPLETED"], states


@pytest.mark.slurm
def test_detached_sweep_status_and_resubmit(cluster, tmp_path, plugin):
    results = tmp_path / "res"
    t0 = time.perf_counter()
    proc = run_cli("-m", *SLURM, "hydra.launcher.wait=false", FLAKY, "rank=8,16", *SMALL, f"results_dir={results}",
                   cwd=tmp_path, env={**plugin, "SLURM_TEST_FAIL": "die16"})
    assert proc.returncode == 0, _out(proc)
    array = _array_id(proc.stdout)
    assert f"detached: 2 jobs submitted ({array}_0, {array}_1)" in proc.stdout
    assert str(results) in proc.stdout and ".submitit" in proc.stdout
    assert time.perf_counter() - t0 < 60 and not list(read_rows(results))  # returned before the jobs ended

    st = _status(results)
    assert st.returncode == 1 and "2 grid points in 1 submitted sweeps" in st.stdout, st.stdout + st.stderr
    for _ in range(120):
        st = _status(results)
        if "pending 0, running 0" in st.stdout:
            break
        time.sleep(1)
    # the killed point left no row (nobody waited for it): missing, with sacct's state
    assert "ok 1, failed 0, missing 1" in st.stdout and f"{array}_1 [FAILED]" in st.stdout, st.stdout
    assert "resubmit failed/missing: " in st.stdout and "hydra.launcher.wait=false" in st.stdout

    again = _status(results, "--resubmit", env=plugin)  # the fault is gone
    assert "1 to run, 1 already ok" in again.stdout, again.stdout + again.stderr
    for _ in range(120):
        st = _status(results)
        if st.returncode == 0:
            break
        time.sleep(1)
    assert "ok 2, failed 0, missing 0" in st.stdout, st.stdout


@pytest.mark.slurm
@pytest.mark.parametrize("override, message", [  # the other checks: test_launch.py, against a fake sinfo
    ("hydra.launcher.partition=gpu_big", "'gpu_big' is not a partition of this cluster"),
])
def test_bad_cluster_input_is_one_clear_error(cluster, tmp_path, override, message):
    results = tmp_path / "res"
    before = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID"], capture_output=True, text=True).stdout
    proc = run_cli("-m", *SLURM, "rank=8", override, *SMALL, f"results_dir={results}", cwd=tmp_path)
    assert proc.returncode == 2, _out(proc)
    assert message in proc.stderr, _out(proc)
    assert not list(read_rows(results)) and not (results / "sweeps").exists()
    after = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID"], capture_output=True, text=True).stdout
    assert after == before  # nothing was submitted


@pytest.mark.slurm
def test_sbatch_refusal_is_surfaced_verbatim(cluster, tmp_path):
    results = tmp_path / "res"
    proc = run_cli("-m", *SLURM, "rank=8", "hydra.launcher.constraint=no_such_feature", *SMALL,
                   f"results_dir={results}", cwd=tmp_path)
    assert proc.returncode == 2, _out(proc)
    assert "sbatch refused the job array, nothing was submitted" in proc.stderr
    assert "sbatch: error:" in proc.stderr, _out(proc)
    assert not list(read_rows(results))


@pytest.mark.slurm
def test_packed_array_task_killed_midway_fails_only_its_points_without_a_row(cluster, tmp_path, plugin):
    """Three points in one array task; the second hard-exits the task: the first keeps its ok row, the
    other two get the launcher's failed rows, and the rerun submits one task for exactly those two."""
    results = tmp_path / "res"
    args = ["-m", *SLURM, "hydra.launcher.points_per_job=3", FLAKY, "rank=8,16,32", *SMALL, f"results_dir={results}"]
    proc = run_cli(*args, cwd=tmp_path, env={**plugin, "SLURM_TEST_FAIL": "die16"})
    assert proc.returncode == 1 and "1 ok, 2 failed, 0 skipped" in proc.stdout, _out(proc)
    job = _array_id(proc.stdout)
    rows = {r.rank: r for r in read_rows(results)}
    assert rows[8].status == "ok" and rows[8].extra["packed"]["job_points"] == 3
    for rank in (16, 32):
        assert rows[rank].status == "failed" and rows[rank].extra["job_state"] == "FAILED", rows[rank].error
        assert rows[rank].slurm_job_id == job and "ended without a row" in rows[rank].error["message"]
    (manifest,) = [json.loads(p.read_text()) for p in (results / "sweeps").glob("*.json")]
    assert {p["job_id"] for p in manifest["points"]} == {job}
    assert not (Path(plugin["SLURM_TEST_MARKER"]) / "started-32-0").exists()  # never reached

    rerun = run_cli(*args, cwd=tmp_path, env=plugin)
    assert rerun.returncode == 0 and "2 to run, 1 already ok" in rerun.stdout, _out(rerun)
    assert "2 ok, 0 failed, 1 skipped" in rerun.stdout and len(_sacct(_array_id(rerun.stdout))) == 1
    assert {r.rank: r.status for r in read_rows(results)} == {8: "ok", 16: "ok", 32: "ok"}


@pytest.mark.slurm
def test_preempted_packed_task_is_requeued_and_resumes_at_its_first_point_without_an_ok_row(cluster, tmp_path, plugin):
    results = tmp_path / "res"
    env = {**os.environ, **plugin, "SLURM_TEST_SLEEP": "0.3"}  # ~11 s of compression per first attempt
    cmd = [sys.executable, "-m", "lrsweep", "-m", *SLURM, "hydra.launcher.timeout_min=15",
           "hydra.launcher.points_per_job=2", FLAKY, "rank=8,16", *SMALL, f"results_dir={results}"]
    log = tmp_path / "sweep.log"
    marker = Path(plugin["SLURM_TEST_MARKER"])
    with (open(log, "w") as out,
          subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT) as sweep):
        for _ in range(480):  # the second point is compressing
            if (marker / "started-16-0").exists() or sweep.poll() is not None:
                break
            time.sleep(0.5)
        assert (marker / "started-16-0").exists(), log.read_text()[-3000:]
        first = (results / "rows").glob("*.json")
        first = {p.name: p.read_text() for p in first}
        subprocess.run(["scancel", "--signal=USR2", _array_id(log.read_text())], check=True)
        sweep.wait(timeout=300)
    stdout = log.read_text()
    assert sweep.returncode == 0 and "2 ok, 0 failed, 0 skipped" in stdout, stdout[-4000:]
    rows = {r.rank: r for r in read_rows(results)}
    assert len(first) == 1 and all((results / "rows" / n).read_text() == t for n, t in first.items())
    assert rows[16].extra["requeues"] == 1 and rows[16].extra["interrupted"][0]["stage"] == "compress"
    assert (marker / "started-16-1").exists() and not (marker / "started-8-1").exists()  # 8 was not rerun
    states = [s for _, s in _sacct(_array_id(stdout), duplicates=True)]
    assert states == ["REQUEUED", "COMPLETED"], states
