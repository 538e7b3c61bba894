"""Faults injected into real sweeps and writers: nothing lost, nothing corrupt, nothing run twice.

Faults come through the public plugin mechanism (``method._target_=faultlib.faults.<name>``);
lrsweep has no special cases for them.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from faultlib.cli import TINY, env, lrsweep
from lrsweep import cache
from lrsweep.row import ResultRow, read_rows, rows_dir, write_row

RANKS = list(range(2, 14))  # 12 grid points
SLEEP_AT, RAISE_AT, KILL_AT = 2, 5, 9  # the sleeper first: it holds one slot until its time-out


def fault_sweep(results_dir: Path, state_dir: Path) -> subprocess.CompletedProcess:
    return lrsweep("-m", f"results_dir={results_dir}", *TINY, "method._target_=faultlib.faults.faulty_svd",
                   f"+method.state_dir={state_dir}", f"+method.sleep_at={SLEEP_AT}", f"+method.raise_at={RAISE_AT}",
                   f"+method.kill_at={KILL_AT}", f"rank={','.join(map(str, RANKS))}",
                   # USR2 at timeout_min - 30 s: long enough for a normal point on a loaded machine
                   "hydra.launcher.timeout_min=2", "hydra.launcher.parallelism=2", "hydra.launcher.points_per_job=1",
                   timeout=1200)


def calls(state_dir: Path) -> list[int]:
    """Ranks of the jobs that ran the method (one target layer: one call per job)."""
    return [int(line.split()[0]) for line in (state_dir / "calls.log").read_text().splitlines()]


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """The 12-point sweep with 3 faults, then the same sweep again (about 2 x 12 grid points)."""
    root = tmp_path_factory.mktemp("faults")
    (root / "state").mkdir()
    first = fault_sweep(root / "results", root / "state")
    rows_first = {r.rank: r for r in read_rows(root / "results")}
    calls_first = calls(root / "state")
    second = fault_sweep(root / "results", root / "state")
    return root, first, rows_first, calls_first, second


@pytest.mark.slow
def test_fault_sweep_nine_ok_three_failed_with_cause(faulted):
    _root, first, rows, _, _ = faulted
    out = first.stdout + first.stderr
    assert first.returncode == 1, out
    assert "9 ok, 3 failed, 0 skipped" in first.stdout, out
    assert sorted(rows) == RANKS
    ok = sorted(r for r, row in rows.items() if row.status == "ok")
    assert ok == sorted(set(RANKS) - {SLEEP_AT, RAISE_AT, KILL_AT})
    raised, killed, slept = rows[RAISE_AT], rows[KILL_AT], rows[SLEEP_AT]
    assert raised.status == "failed" and raised.error["type"] == "RuntimeError"
    assert raised.error["message"] == f"injected fault: exception at rank {RAISE_AT}"
    assert killed.status == "failed" and "ended without a row" in killed.error["message"]
    assert "has not produced any output" in killed.error["message"]
    assert slept.status == "failed" and slept.error["message"] == "Job not requeued because: timed-out too many times."
    for row in (raised, killed, slept):
        assert f"[lrsweep] failed {row.run_id}" in first.stdout


@pytest.mark.slow
def test_fault_sweep_rerun_executes_exactly_the_failed_points(faulted):
    root, _, rows_first, calls_first, second = faulted
    assert second.returncode == 0, second.stdout + second.stderr
    assert "12 grid points: 3 to run, 9 already ok" in second.stdout
    assert "3 ok, 0 failed, 9 skipped" in second.stdout
    assert sorted(calls(root / "state")[len(calls_first):]) == sorted([SLEEP_AT, RAISE_AT, KILL_AT])
    rows = {r.rank: r for r in read_rows(root / "results")}
    assert sorted(rows) == RANKS and all(r.status == "ok" for r in rows.values())
    for rank, row in rows.items():  # the 9 ok rows were not rewritten
        if rank not in (SLEEP_AT, RAISE_AT, KILL_AT):
            assert row.to_dict() == rows_first[rank].to_dict()


# ---------------------------------------------------------------- atomic rows
def _row(run_id: str, i: int) -> ResultRow:
    payload = {f"encoder.layer.{k}.weight": float(i + k) for k in range(3000)}  # ~100 KB: writes take a while
    return ResultRow(run_id=run_id, status="ok", rank=i, layer_errors=payload, extra={"i": i, "n": len(payload)})


def _writer(results_dir: Path, seed: int) -> None:
    """Child process: rewrite rows w0..w4 forever (until SIGKILL)."""
    rnd = random.Random(seed)
    i = 0
    while True:
        i += 1
        write_row(results_dir, _row(f"w{rnd.randrange(5)}", i))


@pytest.mark.e2e
def test_writer_killed_fifty_times_leaves_no_partial_row(tmp_path):
    rnd = random.Random(0)
    kills, reads = 0, 0
    for k in range(50):
        pids = []
        for j in range(2):  # two writers on the same run_ids
            pid = os.fork()
            if pid == 0:
                try:
                    _writer(tmp_path, k * 2 + j)
                finally:
                    os._exit(1)
            pids.append(pid)
        deadline = time.monotonic() + rnd.uniform(0.005, 0.08)
        give_up = time.monotonic() + 30  # under load the writers may not have run yet: read until a row exists
        while time.monotonic() < deadline or (reads == 0 and time.monotonic() < give_up):  # a reader while they write
            rows = list(read_rows(tmp_path))
            reads += len(rows)
            assert all(r.extra["n"] == len(r.layer_errors) for r in rows)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            kills += 1
    assert kills == 100 and reads > 0
    files = sorted(p.name for p in rows_dir(tmp_path).glob("*.json"))
    rows = list(read_rows(tmp_path))  # every row parses
    assert [r.run_id for r in rows] == [f[:-5] for f in files] and len(set(files)) == len(files)
    for r in rows:
        assert r.to_dict() == _row(r.run_id, r.extra["i"]).to_dict()  # complete, not a mix of writes
    # killed writers may leave temp files; they are never read as rows
    stale = list(rows_dir(tmp_path).glob(".*.tmp"))
    assert all(not p.name.endswith(".json") for p in stale)


def test_stale_temp_files_never_count_as_rows(tmp_path):
    write_row(tmp_path, _row("abc", 1))
    (rows_dir(tmp_path) / ".abc.x1y2.tmp").write_text('{"run_id": "abc", "status": "ok"')  # a killed writer's
    (rows_dir(tmp_path) / ".zzz.q.tmp").write_text("")
    assert [r.run_id for r in read_rows(tmp_path)] == ["abc"]


# ---------------------------------------------------------------- shared cache
def _compute_once(cache_dir: str, log: str) -> None:
    def compute():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        g = torch.Generator().manual_seed(0)
        return {"xtx": torch.randn(64, 64, generator=g, dtype=torch.float64)}, {"n_tokens": 123}

    tensors, info, _ = cache.get_or_compute(cache_dir, "calib", {"model": "m", "n": 8}, compute)
    out = Path(log).with_name(f"got-{os.getpid()}.pt")
    torch.save({"xtx": tensors["xtx"], "n": info["n_tokens"]}, out)


def test_concurrent_processes_compute_a_cache_entry_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    log = tmp_path / "computed.log"
    procs = [ctx.Process(target=_compute_once, args=(str(tmp_path / "cache"), str(log))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().splitlines()) == 1  # computed once, the others waited and read it
    got = [torch.load(f, weights_only=True) for f in tmp_path.glob("got-*.pt")]
    assert len(got) == 4 and all(torch.equal(g["xtx"], got[0]["xtx"]) and g["n"] == 123 for g in got)
    entries = list((tmp_path / "cache" / "calib").iterdir())
    assert len([e for e in entries if e.suffix == ".safetensors"]) == 1
    assert not [e for e in entries if e.name.endswith(".tmp")]


# ---------------------------------------------------------------- concurrent jobs, determinism
CALIB_RUN = ["method=svdllm", "rank=8", "calib.n_samples=8", "calib.seq_len=32", "calib.batch_size=4"]
TIMING = re.compile(r"latency|seconds|_at$|time|memory|mem_|peak|host|results_dir|log_path")


def _job(cfg, out: str) -> None:
    """Child process: one grid point (lrsweep.job.run), its row's status written to ``out``."""
    from lrsweep import job

    torch.set_num_threads(1)  # a forked child: one thread, as the CLI's jobs here (OMP_NUM_THREADS=1)
    Path(out).write_text(job.run(cfg).status)


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """The same calibration-based grid point twice, at once, in two processes sharing one fresh cache dir."""
    import multiprocessing as mp

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    root = tmp_path_factory.mktemp("twins")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).parent.parent / "conf"), version_base="1.3"):
        cfgs = [compose("config", overrides=[f"results_dir={root / name}", f"cache_dir={root / 'cache'}", *TINY,
                                             *CALIB_RUN]) for name in ("a", "b")]
    GlobalHydra.instance().clear()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_job, args=(cfg, str(root / f"{name}.status")))
             for cfg, name in zip(cfgs, "ab", strict=True)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [(root / f"{name}.status").read_text() for name in "ab"] == ["ok", "ok"]
    rows = [list(read_rows(root / name)) for name in ("a", "b")]
    assert [len(r) for r in rows] == [1, 1]
    return root, rows[0][0], rows[1][0]


@pytest.mark.e2e
def test_concurrent_jobs_share_one_calibration_cache_entry(twin_runs):
    root, a, b = twin_runs
    entries = sorted((root / "cache" / "calib").iterdir())
    assert len([e for e in entries if e.suffix == ".safetensors"]) == 1, entries
    assert not [e for e in entries if e.name.endswith(".tmp")]
    assert sorted([a.extra["calib"]["cache_hit"], b.extra["calib"]["cache_hit"]]) == [False, True]  # computed once
    same = {k: v for k, v in a.extra["calib"].items() if k not in ("cache_hit", "seconds")}
    assert same == {k: v for k, v in b.extra["calib"].items() if k not in ("cache_hit", "seconds")}
    assert a.run_id == b.run_id


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.e2e
def test_same_config_and_seed_give_identical_metrics(twin_runs):
    _, a, b = twin_runs
    assert a.run_id == b.run_id and a.status == b.status == "ok"
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    differing = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    assert all(TIMING.search(k) or k.startswith("extra.calib.") for k in differing), differing
    for key in ("recon_rel_err", "accuracy", "accuracy_dense", "bits_compressed", "compression_ratio"):
        assert fa[key] is not None and fa[key] == fb[key], key
    assert a.layer_errors == b.layer_errors


# ---------------------------------------------------------------- local preemption
@pytest.mark.slow
def test_preempted_local_job_is_requeued_and_finishes_with_one_ok_row(tmp_path):
    """USR2 to a running local job (what submitit's controller sends, and SLURM on preemption):
    the launcher's checkpoint requeues the point, which then finishes with one ok row."""
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lrsweep", "-m", f"results_dir={tmp_path / 'results'}", *TINY,
                             "method._target_=faultlib.faults.checkpointed_svd", f"+method.state_dir={state}",
                             "rank=4", "hydra.launcher.points_per_job=1"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 300
    while not (state / "waiting").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.5)
    os.kill(int((state / "waiting").read_text()), signal.SIGUSR2)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert "1 ok, 0 failed, 0 skipped" in out
    rows = list(read_rows(tmp_path / "results"))
    assert len(rows) == 1 and rows[0].status == "ok" and rows[0].rank == 4
    logs = "".join(f.read_text() for f in (tmp_path / "results").rglob("*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs


# ---------------------------------------------------------------- packed jobs
@pytest.mark.slow
def test_killed_packed_job_fails_only_its_points_without_a_row_and_rerun_runs_those(tmp_path):
    """One job of three points; the second SIGKILLs the job: the first keeps its ok row, the second
    and third get the launcher's failed rows, and the rerun runs exactly those two (in one job)."""
    (tmp_path / "state").mkdir()
    args = ["-m", f"results_dir={tmp_path / 'results'}", *TINY, "method._target_=faultlib.faults.faulty_svd",
            f"+method.state_dir={tmp_path / 'state'}", "+method.kill_at=3", "rank=2,3,4",
            "hydra.launcher.points_per_job=3"]
    first = lrsweep(*args)
    assert first.returncode == 1 and "1 ok, 2 failed, 0 skipped" in first.stdout, first.stdout + first.stderr
    rows = {r.rank: r for r in read_rows(tmp_path / "results")}
    assert rows[2].status == "ok" and rows[2].extra["packed"]["job_points"] == 3
    for rank in (3, 4):
        assert rows[rank].status == "failed" and "ended without a row" in rows[rank].error["message"]
    assert calls(tmp_path / "state") == [2, 3]
    second = lrsweep(*args)
    assert second.returncode == 0 and "2 ok, 0 failed, 1 skipped" in second.stdout, second.stdout + second.stderr
    assert "3 grid points: 2 to run, 1 already ok" in second.stdout
    assert calls(tmp_path / "state")[2:] == [3, 4]
    assert {r.rank: r.status for r in read_rows(tmp_path / "results")} == {2: "ok", 3: "ok", 4: "ok"}


@pytest.mark.slow
def test_preempted_packed_job_resumes_at_its_first_point_without_an_ok_row(tmp_path):
    """USR2 while the second of two points runs: the requeued job skips the first (its ok row was
    written in this sweep) and reruns the second."""
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lrsweep", "-m", f"results_dir={tmp_path / 'results'}", *TINY,
                             "method._target_=faultlib.faults.checkpointed_svd", f"+method.state_dir={state}",
                             "+method.wait_at=5", "rank=4,5", "hydra.launcher.points_per_job=2"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 300
    while not (state / "waiting").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.5)
    first = {r.rank: r for r in read_rows(tmp_path / "results")}
    os.kill(int((state / "waiting").read_text()), signal.SIGUSR2)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and "2 ok, 0 failed, 0 skipped" in out, out
    rows = {r.rank: r for r in read_rows(tmp_path / "results")}
    assert list(first) == [4] and rows[4].to_dict() == first[4].to_dict()  # not run again
    assert calls(state) == [4, 5, 5]
    assert rows[5].status == "ok" and rows[5].extra["requeues"] == 1
    logs = "".join(f.read_text() for f in (tmp_path / "results").rglob("*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs
