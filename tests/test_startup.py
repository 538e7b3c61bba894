"""What makes a sweep start and finish sooner without changing what it measures: the probe's
length-sorted batches, points dealt round-robin into packed jobs, W&B runs without system info,
the end-of-sweep report's modules imported while the last jobs run, and one timing at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO
from lrsweep import evaluate, sweep
from lrsweep.identity import run_id
from lrsweep.logger import read_offline_run

TEXTS = ["A film.", "An overlong, meandering and ultimately pointless exercise in style over any kind of substance "
         "whatsoever, with a cast that deserved better.", "Great!", "Not bad at all, really quite charming.",
         "Terrible pacing; the second act drags on forever and the ending makes no sense.", "Fine.",
         "Warm, funny and sharply observed.", "I laughed, I cried, I checked my watch twice."]


def test_probe_embeds_in_length_sorted_batches_in_the_given_order(minilm, compose):
    """Batched by length, each text's embedding is the one it gets alone (no padding) to float
    rounding, returned in the order of the texts (which are not sorted here)."""
    model, tok = minilm
    cfg = compose([*FAST, "eval.batch_size=3"])
    ctx = evaluate.Context(cfg, tok, "cpu", "", {})
    b = evaluate.embeddings.batches(tok, TEXTS, ctx)
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert [lengths[i] for i in b.order] == sorted(lengths) and b.order.tolist() != list(range(len(TEXTS)))
    assert [len(batch["input_ids"]) for batch in b.batches] == [3, 3, 2]
    emb = evaluate.embed(model, tok, TEXTS, ctx)
    alone = torch.cat([evaluate.embed(model, tok, [t], ctx) for t in TEXTS])
    assert emb.shape == (len(TEXTS), 384) and emb.dtype == torch.float32
    assert torch.allclose(emb, alone, atol=1e-6, rtol=0)
    assert torch.equal(evaluate.embeddings.embed_batches(model, b, "cpu"), emb)


def _points(compose, grid: list[str]) -> list[sweep.Point]:
    out = []
    for i, ov in enumerate(grid):
        cfg = compose([*FAST, *ov.split()])
        out.append(sweep.Point(i, ov.split(), cfg, run_id(cfg)))
    return out


def test_auto_deals_the_quick_start_grid_so_each_job_holds_both_methods(compose):
    grid = ["method=svd rank=32", "method=svd rank=64", "method=lplr rank=32", "method=lplr rank=64"]  # Hydra's order
    points = _points(compose, grid)
    dealt = [[p.describe() for p in job] for job in sweep.pack(points, "auto", 2)]
    assert dealt == [["method=svd rank=32", "method=lplr rank=32"], ["method=svd rank=64", "method=lplr rank=64"]]
    assert [len(job) for job in sweep.pack(points, "auto", 3)] == [2, 2]  # ceil(4/3) points a job, as few jobs
    assert [[p.describe() for p in job] for job in sweep.pack(points, 2, 2)] == [grid[:2], grid[2:]]  # K: runs


def test_auto_never_puts_two_dense_models_in_one_job(compose):
    points = _points(compose, [f"seed={s} rank={r}" for s in (0, 1) for r in (4, 8, 16)])
    jobs = [[(p.cfg.seed, p.cfg.rank) for p in job] for job in sweep.pack(points, "auto", 2)]
    assert jobs == [[(0, 4), (0, 16)], [(0, 8)], [(1, 4), (1, 16)], [(1, 8)]]


LOG_ROW = """
import json, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from lrsweep.logger import log_row
from lrsweep.row import ResultRow
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=["logger=wandb", "logger.mode=offline", f"results_dir={sys.argv[2]}",
                                       *sys.argv[3:]])
row = ResultRow(run_id="abc123", status="ok", method="svd", run_name="svd-r4", accuracy=0.75, config={"rank": 4})
print(json.dumps({"run_dir": log_row(cfg, row), "launch_imported": "wandb.sdk.launch" in sys.modules}))
"""


@pytest.mark.parametrize("system_info", [False, True])
def test_offline_wandb_run_records_system_info_only_when_asked(tmp_path, system_info):
    """Without ``logger.system_info`` a run lists no installed packages (the slow part of wandb.init)
    and wandb's launch package is never imported; the row's summary is logged either way."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LOG_ROW), str(REPO / "conf"), str(tmp_path),
                           f"logger.system_info={system_info}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = Path(out["run_dir"])  # read once the process ended: wandb writes the run's file by its exit
    summary = read_offline_run(run_dir)["summary"]
    assert summary["accuracy"] == 0.75 and summary["run_id"] == "abc123"
    assert (run_dir / "files" / "requirements.txt").exists() is system_info


def test_report_modules_are_imported_once_a_slot_is_free():
    """submit_local starts the report's imports when no job waits for a slot."""
    from lrsweep.sweep import submit

    started = []

    class Job:
        def __init__(self):
            self.ticks = 2

        def done(self) -> bool:
            self.ticks -= 1
            return self.ticks < 0

    pending_jobs: list[Job] = []

    class Executor:
        def submit(self, launcher, *args) -> Job:
            pending_jobs.append(Job())
            return pending_jobs[-1]

    launcher = type("L", (), {"_EXECUTOR": "local", "params": {"parallelism": 2}})()
    jobs = submit.submit_local(launcher, Executor(), [((), None, "")] * 3,
                               while_last=lambda: started.append(len(pending_jobs)))
    assert len(jobs) == 3 and started and started[0] == 3  # only after the third (last) job was submitted


def test_prefetch_report_imports_the_summary_in_a_thread():
    prefetch = sweep.Prefetch()
    prefetch.wait()  # nothing started: returns at once
    prefetch.start()
    thread = prefetch.thread
    prefetch.start()  # once per sweep
    assert prefetch.thread is thread
    prefetch.wait()
    assert not thread.is_alive() and "analysis.summary" in sys.modules


def test_timing_lock_does_the_waiting_work_only_while_a_sibling_times(compose, tmp_path):
    import fcntl
    import socket

    calls = []
    with evaluate.timing_lock(tmp_path, "cpu", while_waiting=lambda: calls.append("free")) as lock:
        assert lock["waited_s"] >= 0
    assert calls == []
    with open(tmp_path / "locks" / f"timing-{socket.gethostname()}-cpu.lock", "a") as sibling:
        fcntl.flock(sibling, fcntl.LOCK_EX)  # flock locks belong to the open file: this is another holder

        def work_then_sibling_done() -> None:
            calls.append("busy")
            fcntl.flock(sibling, fcntl.LOCK_UN)

        with evaluate.timing_lock(tmp_path, "cpu", while_waiting=work_then_sibling_done):
            calls.append("timing")
    assert calls == ["busy", "timing"]


@pytest.mark.parametrize("sibling_times", [False, True])
def test_a_job_prepares_its_dense_metrics_while_a_sibling_times(compose, tmp_path, monkeypatch, sibling_times):
    """The dense model is timed first; a job that finds a sibling timing does its task's prepare
    (a cold cache's embeddings, shared with that sibling) meanwhile, then times or reads the latency."""
    import dataclasses
    import fcntl
    import socket

    from lrsweep import job

    cfg = compose([*FAST, f"cache_dir={tmp_path}"])
    calls = []
    (tmp_path / "locks").mkdir()
    with open(tmp_path / "locks" / f"timing-{socket.gethostname()}-cpu.lock", "a") as sibling:
        if sibling_times:
            fcntl.flock(sibling, fcntl.LOCK_EX)

        def prepare(model, ctx):
            calls.append("prepare")
            fcntl.flock(sibling, fcntl.LOCK_UN)  # the sibling is done timing
            return {"prepared": True}

        task = evaluate.task_for(cfg)
        monkeypatch.setitem(evaluate.TASKS, task.name, dataclasses.replace(task, prepare=prepare))
        monkeypatch.setattr(evaluate, "speed",
                            lambda model, ctx: calls.append("timed") or evaluate.Speed(1.0, 1.0, {}, 1))
        d = job.load_dense(cfg, "cpu", str(tmp_path), share=None)
    assert d.state == {"prepared": True} and d.speed.median_ms == 1.0
    assert calls == (["prepare", "timed"] if sibling_times else ["timed", "prepare"])


@pytest.mark.parametrize("overrides, times", [([], False), (["inference.fallback=auto"], True),
                                              (["eval.latency.per_layer=true"], True)])
def test_layers_are_timed_only_when_asked(compose, overrides, times):
    """Without per-layer timing a point takes the timing lock once (its model), not twice."""
    assert evaluate.times_layers(compose([*FAST, *overrides])) is times


@pytest.mark.parametrize("ours", [True, False])
def test_grid_sweeper_leaves_composing_the_points_to_lrsweep_launchers(tmp_path, ours):
    from types import SimpleNamespace

    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from hydra_plugins.lrsweep_launcher.launcher import GridSweeper, LocalLauncher

    composed, launched = [], []
    sweeper = GridSweeper(max_batch_size=None)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    loader = SimpleNamespace(load_sweep_config=lambda master_config, sweep_overrides: composed.append(sweep_overrides))
    sweeper.hydra_context = SimpleNamespace(config_loader=loader)
    sweeper.launcher = LocalLauncher.__new__(LocalLauncher) if ours else SimpleNamespace()
    sweeper.launcher.launch = lambda batch, initial_job_idx: launched.append(batch) or [
        JobReturn(status=JobStatus.COMPLETED, _return_value="ok") for _ in batch]
    sweeper.sweep(["rank=4,8", "seed=0"])
    assert launched == [[["rank=4", "seed=0"], ["rank=8", "seed=0"]]]
    # lrsweep.sweep.planning composes (and validates) each point once; any other launcher: Hydra's check first
    assert composed == ([] if ours else [["rank=4", "seed=0"], ["rank=8", "seed=0"]])


def test_the_sweeper_is_lrsweeps_grid_sweeper(compose):
    assert compose([], hydra_cfg=True).hydra.sweeper._target_.endswith("lrsweep_launcher.launcher.GridSweeper")


def test_probe_embeddings_shared_between_jobs_are_the_ones_a_job_computes_alone(minilm, compose, tmp_path):
    """embed_shared (a cold cache's dense embeddings, a batch per cache entry) gives embed's tensors
    bitwise, and a second job reads every batch instead of computing it."""
    model, tok = minilm
    ctx = evaluate.Context(compose([*FAST, "eval.batch_size=3", f"cache_dir={tmp_path}"]), tok, "cpu", str(tmp_path),
                           {"model": "minilm"})
    emb = evaluate.embed(model, tok, TEXTS, ctx)
    assert torch.equal(evaluate.embeddings.embed_shared(model, TEXTS, ctx), emb)
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 3
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert torch.equal(evaluate.embeddings.embed_shared(model, TEXTS, ctx), emb) and calls == []
        assert torch.equal(evaluate.embeddings.embed_shared(model, TEXTS[1:], ctx),
                           evaluate.embed(model, tok, TEXTS[1:], ctx))
    finally:
        handle.remove()
    assert calls  # other texts: other entries, computed


