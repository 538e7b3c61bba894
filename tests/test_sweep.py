"""End to end: a Hydra multirun through the real submitit local launcher, rows, W&B, analysis."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, run_cli
from lrsweep import atomic, job, shared_latency
from lrsweep.pack import Pack
from lrsweep.logger import read_offline_run
from lrsweep.row import read_rows

BLOCK0 = r"model.targets=encoder\.layer\.0\.attention\.self\.query"
LAYER0 = r"model.targets=encoder\.layer\.0\..*"  # the six linears of the first encoder block
LAYER0_WEIGHTS = 4 * 384 * 384 + 2 * 1536 * 384

GRID = ["-m", "method=svd,lplr", "rank=8,16", "seeds=1", LAYER0]  # lplr at one seed: four points


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    results = tmp_path_factory.mktemp("sweep")
    fast = [a for a in FAST if a != "logger=none"]
    proc = run_cli(*GRID, *fast, f"results_dir={results}")
    return results, proc, fast


@pytest.mark.e2e
def test_sweep_writes_four_ok_rows(sweep):
    results, proc, _ = sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(read_rows(results))
    assert len(rows) == 4
    assert {(r.method, r.rank) for r in rows} == {("svd", 8), ("svd", 16), ("lplr", 8), ("lplr", 16)}
    for r in rows:
        assert r.status == "ok" and r.error is None
        assert 0 < r.recon_rel_err < 1
        assert 0.5 <= r.accuracy_dense <= 1 and 0 <= r.accuracy <= 1
        assert r.latency_ms > 0 and r.latency_ms_dense > 0
        assert r.params_compressed < r.params_dense
        assert r.compression_ratio > 1 and r.bits_per_weight == pytest.approx(r.bits_compressed / LAYER0_WEIGHTS)
        assert r.config["method"]["name"] == r.method and r.sweep
        assert len(r.layer_errors) == 6
    assert "4 ok, 0 failed, 0 skipped" in proc.stdout
    assert "| minilm" in proc.stdout and "tradeoff.png" in proc.stdout
    # two packed jobs, one dense latency: the first job to time the dense model left it for the other
    assert len({r.extra["packed"]["job_points"] for r in rows}) == 1 and len({r.latency_ms_dense for r in rows}) == 1
    assert all("measured once for this sweep's jobs on" in r.extra["latency_measurement"]["dense"] for r in rows)
    # each point's messages (logging) are in its Hydra job's log file: <sweep dir>/<job num>/cli.log
    logs = "".join(Path(f).read_text() for f in glob.glob(str(results / "hydra" / "*" / "*" / "*.log")))
    for r in rows:
        assert f"[lrsweep] row {results / 'rows' / r.run_id}.json (ok)" in logs
    assert (results / "tradeoff.png").stat().st_size > 0


@pytest.mark.e2e
def test_sweep_logs_one_offline_wandb_run_per_point(sweep):
    results, _, _ = sweep
    runs = sorted(glob.glob(str(results / "wandb" / "offline-run-*")))
    assert len(runs) == 4
    rows = {r.run_id: r for r in read_rows(results)}
    logged = [read_offline_run(d) for d in runs]
    assert {run["summary"]["run_id"] for run in logged} == set(rows)
    for run in logged:
        row = rows[run["summary"]["run_id"]]
        assert run["summary"]["accuracy"] == pytest.approx(row.accuracy)
        assert run["summary"]["status"] == "ok"
        assert run["name"] == row.run_name and run["group"] == row.sweep
        assert run["config"]["rank"] == row.rank


@pytest.mark.e2e
def test_rerun_skips_every_ok_point(sweep):
    results, _, fast = sweep
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(results / "rows" / "*.json"))}
    proc = run_cli(*GRID, *fast, f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 to run, 4 already ok" in proc.stdout
    assert "0 ok, 0 failed, 4 skipped" in proc.stdout
    after = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(results / "rows" / "*.json"))}
    assert after == before


@pytest.mark.e2e
def test_packed_job_isolates_a_raising_point(tmp_path):
    """Three points in one job, the middle one raises: its failed row, then the third point runs."""
    args = ["-m", "method=svd", "method._target_=lrsweep_testplugins.fails_above", "rank=4,16,8", *FAST, BLOCK0,
            "hydra.launcher.points_per_job=3", f"results_dir={tmp_path}"]
    proc = run_cli(*args)
    rows = {r.rank: r for r in read_rows(tmp_path)}
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 points in 1 jobs" in proc.stdout + proc.stderr
    assert rows[16].status == "failed" and "injected failure" in rows[16].error["message"]
    assert "RuntimeError" in rows[16].error["traceback"]
    assert rows[4].status == rows[8].status == "ok"
    assert [rows[r].extra["packed"]["point"] for r in (4, 16, 8)] == [1, 2, 3]  # one job, in grid order
    assert rows[4].latency_ms_dense == rows[8].latency_ms_dense  # the dense model measured once
    assert "2 ok, 1 failed, 0 skipped" in proc.stdout
    assert f"[lrsweep] failed {rows[16].run_id}" in proc.stdout
    # that a rerun runs the failed points only: test_launch.py (fake jobs), test_rerun_skips_every_ok_point


def test_packed_points_measure_what_separate_jobs_measure(compose, tmp_path):
    """The dense model restored between the points of a packed job: same metrics as one job per point."""
    points = ["method=svd rank=4", "method=lplr rank=4 bits=8", "method=svd rank=8 heal=distill ++heal.steps=2"]
    small = ["eval.probe_train=32", "eval.probe_test=32", "eval.latency.batch_size=2", "eval.latency.seq_len=16",
             "eval.latency.shapes=[]"]  # the comparison needs the metrics, not good ones
    cfgs = {name: [compose([*FAST, *small, BLOCK0, *p.split(), f"results_dir={tmp_path / name}"]) for p in points]
            for name in ("alone", "packed")}
    alone = [job.run(c) for c in cfgs["alone"]]
    pack = Pack(len(points), reuse=True)
    packed = [job.run(c, pack) for c in cfgs["packed"]]
    assert [r.extra["packed"]["dense_reused"] for r in packed] == [False, True, True]
    for a, b in zip(alone, packed, strict=True):
        assert a.status == b.status == "ok", (a.error, b.error)
        for key in ("recon_rel_err", "accuracy", "accuracy_dense", "bits_compressed", "params_compressed"):
            assert getattr(a, key) == getattr(b, key), key
        assert a.layer_errors == b.layer_errors


def test_dense_latency_is_timed_once_per_sweep_host_and_threads(compose, tmp_path, monkeypatch):
    """In packed jobs of one sweep the first job times the dense model and the others read it; another
    sweep, thread count or dense model times again."""
    timed = []
    monkeypatch.setattr(job.evaluate, "speed", lambda model, ctx: timed.append(1) or job.evaluate.Speed(
        len(timed), 2.0, {"b1xt8": {"median": len(timed), "p90": 2.0}}, 100))
    cfg = compose([*FAST, f"cache_dir={tmp_path / 'cache'}"])
    ctx = type("C", (), {"device": "cpu", "cache_dir": str(tmp_path / "cache")})()

    def dense_speed(cfg, share):
        return shared_latency.dense_speed(cfg, None, ctx, share, job.dense_key(cfg))

    hows = []
    for share in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):
        speed, how, _ = dense_speed(cfg, share)
        hows.append((speed.median_ms, how))
    assert len(timed) == 2 and hows[0][0] == hows[1][0] == 1 and hows[2][0] == 2
    assert all("measured once for this sweep's jobs on" in h for _, h in hows)
    torch.set_num_threads(torch.get_num_threads() + 1)
    try:
        dense_speed(cfg, tmp_path / "a")
    finally:
        torch.set_num_threads(torch.get_num_threads() - 1)
    dense_speed(compose([*FAST, "eval.latency.seq_len=9", f"cache_dir={tmp_path / 'cache'}"]), tmp_path / "a")
    assert len(timed) == 4
    # no sweep folder (in-process packing): timed in the job
    assert dense_speed(cfg, None)[1] == "measured in this job" and len(timed) == 5
    (tmp_path / "a file").write_text("")
    # a share folder that cannot be made: timed here, unshared
    assert dense_speed(cfg, tmp_path / "a file")[1] == "measured in this job" and len(timed) == 6


def _hold_lock(path, ready, release):
    from filelock import FileLock

    with FileLock(path):
        ready.set()
        release.wait(30)


def test_a_job_whose_sibling_times_the_dense_model_goes_on_and_reads_it_when_its_row_needs_it(
        compose, tmp_path, monkeypatch):
    """The sibling (another process) holds the dense model's timing lock: this job gets None at once,
    then waits for the sibling's figure; had the sibling died without one, a fresh copy is timed here."""
    import multiprocessing as mp

    timed = []
    monkeypatch.setattr(job.evaluate, "speed", lambda model, ctx: timed.append(model) or job.evaluate.Speed(
        7.0, 8.0, {}, 100))
    cfg = compose([*FAST, f"cache_dir={tmp_path / 'cache'}"])
    ctx = type("C", (), {"device": "cpu", "cache_dir": str(tmp_path / "cache")})()
    share, key = tmp_path / "share", job.dense_key(cfg)
    path = shared_latency._path(ctx, share, key)
    path.parent.mkdir(parents=True)
    fork = mp.get_context("fork")
    ready, release = fork.Event(), fork.Event()
    sibling = fork.Process(target=_hold_lock, args=(f"{path}.lock", ready, release))
    sibling.start()
    try:
        assert ready.wait(30)
        assert shared_latency.dense_speed(cfg, "dense model", ctx, share, key) == (None, "pending", 0.0)
        assert not timed
        atomic.write_json(path, {"speed": {"median_ms": 5.0, "p90_ms": 6.0, "shapes": {}, "model_bytes": 9},
                                 "job": "41", "host": "h", "threads": 1})
    finally:
        release.set()
        sibling.join()
    speed, how = shared_latency.pending(cfg, ctx, share, key)
    assert speed.median_ms == 5.0 and "by job 41" in how and not timed
    path.unlink()  # the sibling died before writing it
    monkeypatch.setattr(shared_latency.models, "load", lambda *a: ("fresh dense copy", None))
    speed, how = shared_latency.pending(cfg, ctx, share, key)
    assert timed == ["fresh dense copy"] and speed.median_ms == 7.0 and path.exists()


@pytest.mark.e2e
def test_dry_run_lists_status_and_estimate_and_writes_nothing(sweep):
    results, _, fast = sweep
    before = sorted(p for p in results.rglob("*"))
    proc = run_cli("-m", "method=svd,lplr", "rank=8,16,24", "seeds=1", LAYER0, *fast, f"results_dir={results}",
                   "dry_run=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p for p in results.rglob("*")) == before
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 6
    ok = {r.run_id: r for r in read_rows(results)}
    for line in lines:
        _index, rid, status, est = line.split()[:4]
        assert status == ("ok" if rid in ok else "missing")
        method = "svd" if "method=svd" in line else "lplr"
        expected = sorted(r.wall_seconds for r in ok.values() if r.method == method)
        assert float(est) == pytest.approx(sum(expected) / 2, abs=0.06)  # median of two ok rows
    assert "4 ok, 2 missing" in proc.stdout and "nothing was launched" in proc.stdout


# the CLI's exit 2 for a launcher-side error; test_launch.py checks more values in-process
@pytest.mark.parametrize("args, key", [(["hydra.launcher.points_per_job=0"], "hydra.launcher.points_per_job"),
                                       (["dry_run=true", "rank=-3"], "rank")])
@pytest.mark.e2e
def test_bad_points_per_job_or_dry_run_config_error_exit_2(tmp_path, args, key):
    proc = run_cli("-m", "rank=4,8", *FAST, f"results_dir={tmp_path}", *args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"config error: {key}" in proc.stderr or f"{key}:" in proc.stderr, proc.stderr
    assert not list(read_rows(tmp_path))


APP = """
import sys, hydra
@hydra.main(version_base=None, config_path=None)
def main(cfg):
    print("HEAVY", sorted(m for m in ("torch", "lrsweep", "submitit") if m in sys.modules))
main()
"""
COMPOSE = """
import sys
from hydra import compose, initialize_config_dir
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    print("COMPOSED", compose("app", overrides=["a=2"]).a)
"""


def test_unrelated_hydra_app_and_compose_api_work_with_lrsweep_installed(tmp_path):
    """A fresh interpreter with lrsweep's plugin on the path and never imported: Hydra's plugin scan
    must neither crash nor import anything heavy."""
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "compose.py").write_text(COMPOSE)
    (tmp_path / "app.yaml").write_text("a: 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    app = subprocess.run([sys.executable, "app.py", "+x=1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert app.returncode == 0, app.stderr
    assert "HEAVY []" in app.stdout  # the scan imported neither torch, lrsweep nor submitit
    comp = subprocess.run([sys.executable, "compose.py", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert comp.returncode == 0 and "COMPOSED 2" in comp.stdout, comp.stderr
    scan = subprocess.run([sys.executable, "-c", "from hydra.core.plugins import Plugins; from hydra.plugins.launcher "
                           "import Launcher; print([p.__name__ for p in Plugins.instance().discover(Launcher)])"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "SlurmLauncher" in scan.stdout and "LocalLauncher" in scan.stdout, scan.stderr


@pytest.mark.e2e
def test_analysis_table_and_plot_on_sweep_rows(sweep, tmp_path, capsys):
    """``python -m analysis`` (its main, in-process) on the rows of the real sweep."""
    from analysis.__main__ import main as analysis_main

    results, _, _ = sweep
    for fmt, marker in (("markdown", "| minilm"), ("latex", "\\toprule")):
        assert analysis_main(["table", str(results), "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert marker in out and "lplr" in out and "svd" in out
    png = tmp_path / "t.png"
    assert analysis_main(["plot", str(results), "-o", str(png)]) == 0
    assert png.stat().st_size > 5000


@pytest.mark.e2e
def test_single_run_without_m(tmp_path):
    proc = run_cli("method=svd", "rank=4", "bits=8", *FAST, BLOCK0, f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = read_rows(tmp_path)
    assert row.status == "ok" and row.bits == 8 and row.rank == 4
    assert json.loads((tmp_path / "rows" / f"{row.run_id}.json").read_text())["config"]["bits"] == 8
    # messages go through logging: on stdout as before, and in the run's Hydra log file
    assert f"[lrsweep] row {tmp_path / 'rows' / row.run_id}.json (ok)" in proc.stdout
    (log,) = glob.glob(str(tmp_path / "hydra" / "*" / "*.log"))
    assert f"[lrsweep] row {tmp_path / 'rows' / row.run_id}.json (ok)" in Path(log).read_text()


def test_dry_run_and_points_per_job_do_not_change_run_ids(compose):
    from lrsweep.identity import run_id

    base = run_id(compose(["rank=8"]))
    assert run_id(compose(["rank=8", "dry_run=true"])) == base
    assert run_id(compose(["rank=8", "hydra.launcher.points_per_job=4"])) == base


def test_points_differing_only_in_how_they_compress_share_the_dense_model(compose):
    """param_ratio / budget / allocation sweeps pack: they compress the same dense model differently."""
    from lrsweep.job import dense_key

    base = dense_key(compose())
    for point in (["param_ratio=0.6"], ["budget=4"], ["allocation=spectrum", "param_ratio=0.8"],
                  ["method=lplr", "rank=64"]):
        assert dense_key(compose(point)) == base, point
    for other in (["seed=1"], ["data=bbc"], ["model.targets=encoder\\.layer\\.0\\..*"]):
        assert dense_key(compose(other)) != base, other


@pytest.mark.parametrize("executor, params, auto", [
    ("local", {}, "cpu"),  # submitit's local jobs get CUDA_VISIBLE_DEVICES='' unless GPUs are requested
    ("local", {"gpus_per_node": 1}, None),  # this machine's: cuda when available here
    ("slurm", {"gpus_per_node": 0}, "cpu"),
    ("slurm", {"gpus_per_node": 2}, "cuda"),  # planned on the login node for jobs on GPU nodes
    ("slurm", {"gres": "gpu:1"}, "cuda"),
])
def test_device_auto_of_a_sweep_is_what_its_jobs_see(compose, executor, params, auto):
    from types import SimpleNamespace

    from lrsweep import sweep
    from lrsweep.identity import run_id

    launcher = SimpleNamespace(_EXECUTOR=executor, params=params)
    assert sweep.auto_device(launcher) == auto
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert run_id(compose(["device=auto"]), sweep.auto_device(launcher)) == run_id(compose([f"device={auto or here}"]))


def test_device_cuda_in_jobs_without_gpus_is_a_config_error(compose):
    from lrsweep import sweep
    from lrsweep.errors import ConfigError

    points = [sweep.Point(0, [], compose(["device=cuda"]), "x")]
    with pytest.raises(ConfigError, match="'cuda' but the jobs ask for no GPU"):
        sweep.check_gpus({}, points)
    sweep.check_gpus({"gpus_per_node": 1}, points)
    sweep.check_gpus({}, [sweep.Point(0, [], compose(["device=auto"]), "x")])
