"""End to end: a Hydra multirun through the real submitit local launcher, rows, W&B, analysis."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import FAST, REPO, run_cli
from lrsweep.logger import read_offline_run
from lrsweep.row import read_rows

GRID = ["-m", "method=svd,lplr", "rank=8,16"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    results = tmp_path_factory.mktemp("sweep")
    fast = [a for a in FAST if a != "logger=none"]
    proc = run_cli(*GRID, *fast, f"results_dir={results}")
    return results, proc, fast


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
        assert r.compression_ratio > 1 and r.bits_per_weight == pytest.approx(r.bits_compressed / sum(
            n * d for n, d in [(384, 384)] * 24 + [(1536, 384), (384, 1536)] * 6))
        assert r.config["method"]["name"] == r.method and r.sweep
        assert len(r.layer_errors) == 36
    assert "4 ok, 0 failed, 0 skipped" in proc.stdout
    assert "| minilm" in proc.stdout and "tradeoff.png" in proc.stdout
    assert (results / "tradeoff.png").stat().st_size > 0


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


def test_rerun_skips_every_ok_point(sweep):
    results, _, fast = sweep
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(results / "rows" / "*.json"))}
    proc = run_cli(*GRID, *fast, f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 to run, 4 already ok" in proc.stdout
    assert "0 ok, 0 failed, 4 skipped" in proc.stdout
    after = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(results / "rows" / "*.json"))}
    assert after == before


def test_failing_point_leaves_failed_row_and_others_finish(tmp_path):
    args = ["-m", "method=svd", "method._target_=lrsweep_testplugins.fails_above", "rank=8,16", *FAST,
            f"results_dir={tmp_path}"]
    proc = run_cli(*args)
    rows = {r.rank: r for r in read_rows(tmp_path)}
    assert proc.returncode == 1
    assert rows[16].status == "failed" and "injected failure" in rows[16].error["message"]
    assert "RuntimeError" in rows[16].error["traceback"]
    assert rows[8].status == "ok"
    assert "1 ok, 1 failed, 0 skipped" in proc.stdout
    rerun = run_cli(*args)  # the rerun runs the failed point only
    assert "1 to run, 1 already ok" in rerun.stdout and rerun.returncode == 1


def test_analysis_table_and_plot_on_sweep_rows(sweep, tmp_path):
    results, _, _ = sweep
    for fmt, marker in (("markdown", "| minilm"), ("latex", "\\toprule")):
        out = subprocess.run([sys.executable, "-m", "analysis", "table", str(results), "--format", fmt],
                             capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert marker in out.stdout and "lplr" in out.stdout and "svd" in out.stdout
    png = tmp_path / "t.png"
    out = subprocess.run([sys.executable, "-m", "analysis", "plot", str(results), "-o", str(png)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 5000


def test_single_run_without_m(tmp_path):
    proc = run_cli("method=svd", "rank=4", "bits=8", *FAST, f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = read_rows(tmp_path)
    assert row.status == "ok" and row.bits == 8 and row.rank == 4
    assert json.loads((tmp_path / "rows" / f"{row.run_id}.json").read_text())["config"]["bits"] == 8
