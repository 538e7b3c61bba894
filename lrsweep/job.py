"""One grid point: load → compress → evaluate → write the row → log it to W&B.

Any exception after validation becomes a ``failed`` row with the traceback; the row is
written atomically before W&B sees it, so a logging problem never loses a result.

A point runs in a :class:`lrsweep.pack.Pack`: a sweep's job keeps the dense model for its next
points (their dense_key equal), a single run a pack of one. Latency is timed under a per-host,
per-device lock (lrsweep.evaluate.timing_lock); in a sweep the dense model is timed once for the
launch's jobs (lrsweep.shared_latency). The row's ``extra["latency_measurement"]`` says how.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lrsweep import allocate, evaluate, heal, identity, logger, models, provenance, schedule, shared_latency
from lrsweep.checkpoint import Attempt
from lrsweep.compress import LayerResult
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.pack import Dense, Pack
from lrsweep.row import ResultRow, now, read_row, row_path, row_status, write_row
from lrsweep.validate import resolve_device, validate

log = logging.getLogger(__name__)


class PointFailed(Exception):
    """A grid point whose row says failed (the message is the row's error)."""


def _threads(cfg: DictConfig) -> None:
    n = cfg.get("threads") or os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("LRSWEEP_THREADS")
    if n:
        torch.set_num_threads(int(n))


def new_row(cfg: DictConfig) -> ResultRow:
    row = ResultRow(run_id=identity.run_id(cfg), model=str(cfg.model.name), method=str(cfg.method.name),
                    rank=None if cfg.budget is not None or cfg.get("param_ratio") is not None else cfg.rank,
                    bits=cfg.bits, budget=cfg.budget, param_ratio=cfg.get("param_ratio"),
                    seed=int(cfg.seed),
                    run_name=identity.run_name(cfg), sweep=str(cfg.get("sweep_name") or ""),
                    started_at=now(), git_sha=provenance.git_sha(), versions=provenance.versions(),
                    host=socket.gethostname(), config=OmegaConf.to_container(cfg, resolve=True))
    row.config.pop("hydra", None)
    provenance.job_fields(row)
    return row


def write_failed(cfg: DictConfig, error: BaseException, message: str | None = None, traceback: str | None = None,
                 **fields: Any) -> ResultRow:
    """Write the failed row of a grid point that has no row of its own (ResultRow.fail; ``fields``
    set before it), e.g. a job that died or a point that could not start."""
    row = new_row(cfg)
    for key, value in fields.items():
        setattr(row, key, value)
    write_row(os.path.abspath(str(cfg.results_dir)), row.fail(error, message, traceback))
    return row


dense_key = identity.dense_key  # what the points of one packed job share (lrsweep.identity.NOT_DENSE_MODEL)


def load_dense(cfg: DictConfig, device: str, cache_dir: str, share: str | os.PathLike | None) -> Dense:
    """Load the dense model and measure it: the task's dense metrics (task.prepare) and its latency."""
    model, tokenizer = models.load(cfg.model, device, cache_dir)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"the loaded weights contain NaN/Inf ({name})")
    mkey = provenance.model_key(cfg)
    ctx = Context(cfg, tokenizer, device, cache_dir, mkey)
    task, state, key = evaluate.task_for(cfg), [], dense_key(cfg)

    def prepare() -> None:  # the dense task metrics: read from the cache, or computed (with the sibling jobs)
        if not state:
            state.append(task.prepare(model, ctx))

    # timed first: a job that finds a sibling timing does its prepare meanwhile, and on a cold cache
    # the sibling joins that work once it is done timing (cache.shared_parts), instead of one job
    # computing the dense metrics while the other waits for them and then for the timing
    speed, how, waited = shared_latency.dense_speed(cfg, model, ctx, share, key,
                                                    while_waiting=lambda: (prepare(), logger.prepare(cfg)))
    prepare()
    return Dense(key, model, tokenizer, mkey, state[0], speed, sum(p.numel() for p in model.parameters()),
                 torch.get_rng_state(), waited, how)


def _size_fields(row: ResultRow, results: list[LayerResult]) -> None:
    """Size and reconstruction fields of the row from the layer results."""
    weights = sum(r.shape[0] * r.shape[1] for r in results)
    row.layers_compressed = len(results)
    row.layer_errors = {r.name: r.rel_err for r in results}
    row.recon_rel_err = sum(r.rel_err * r.shape[0] * r.shape[1] for r in results) / weights
    row.bits_dense = sum(r.dense_bits for r in results)
    row.bits_compressed = sum(r.storage_bits for r in results)
    row.bits_per_weight = row.bits_compressed / weights
    row.compression_ratio = row.bits_dense / row.bits_compressed
    if all(r.params is not None for r in results):
        row.param_ratio_measured = sum(r.params for r in results) / weights
    row.exceeds_break_even = any(r.exceeds_break_even for r in results)


def _heal(model, originals, results, ctx: Context, task: evaluate.Task, state, row: ResultRow) -> None:
    """Measure the compressed model, heal it, and keep the first measurements as ``*_pre_heal``."""
    _size_fields(row, results)
    row.recon_rel_err_pre_heal, row.bits_per_weight_pre_heal = row.recon_rel_err, row.bits_per_weight
    for key, value in task.evaluate(model, ctx, state).items():
        if hasattr(row, f"{key}_pre_heal"):
            setattr(row, f"{key}_pre_heal", value)
    row.heal = str(ctx.cfg.heal.name)
    t0 = time.perf_counter()
    row.extra["heal"] = heal.apply(model, originals, results, ctx)
    row.heal_seconds = time.perf_counter() - t0



def execute(cfg: DictConfig, row: ResultRow, pack: Pack, attempt: Attempt) -> None:
    """Fill ``row`` with the measurements of this grid point (raises on failure)."""
    t_all = time.perf_counter()
    device = resolve_device(str(cfg.device))
    row.device = device
    if device.startswith("cuda"):
        row.gpu_name = torch.cuda.get_device_name(device)
    _threads(cfg)
    torch.manual_seed(int(cfg.seed))
    cache_dir = os.path.abspath(str(cfg.cache_dir))
    attempt.stage("load")
    d = pack.dense_for(dense_key(cfg), lambda: load_dense(cfg, device, cache_dir, pack.share))
    model, tokenizer, state = d.model, d.tokenizer, d.state
    ctx = Context(cfg, tokenizer, device, cache_dir, d.model_key)
    task = evaluate.task_for(cfg)
    row.params_dense = d.params
    if pack.reuse:
        row.extra["packed"] = {"job_points": pack.size, "point": d.points, "dense_reused": d.points > 1,
                               **({"taken_over": True} if pack.taken_over else {})}  # a sibling job's point

    layers = models.target_modules(model, cfg.model.targets)
    before = heal.snapshot(model) if cfg.get("heal") else {}
    attempt.stage("compress", layers=len(layers))
    t0 = time.perf_counter()
    results, schedule_info = schedule.compress(model, layers, ctx, progress=bool(cfg.get("progress", True)))
    row.compress_seconds = time.perf_counter() - t0
    allocate.record(row, cfg, results, schedule_info.pop("allocation", None))
    if schedule_info:
        row.extra["stream" if schedule_info.get("stream") else "calib"] = schedule_info
    if cfg.get("heal"):
        attempt.stage("heal")
        _heal(model, heal.replaced(before, model), results, ctx, task, state, row)

    _size_fields(row, results)
    row.params_compressed = sum(p.numel() for p in model.parameters())
    row.extra["layer_ranks"] = {r.name: r.rank for r in results}
    row.extra["layer_seconds"] = {r.name: round(r.seconds, 4) for r in results}
    info = {r.name: r.info for r in results if r.info}
    if info:  # method details per layer (solver, Cholesky shift, a_shape, nnz, ...)
        row.extra["method_info"] = json.loads(json.dumps(info, default=str))

    attempt.stage("evaluate")
    waited = 0.0
    if evaluate.times_layers(cfg):  # layers are timed (and fall back) under the lock too
        with evaluate.timing_lock(cache_dir, device) as lock:
            row.extra.update(evaluate.layer_fallback(model, [r.name for r in results], ctx))
        waited = lock["waited_s"]
    for key, value in task.evaluate(model, ctx, state).items():
        if key == "extra":
            row.extra.update(value)
        else:
            setattr(row, key, value)
    if d.speed is None:  # a sibling job was timing the dense model: its figure, now that this row needs it
        d.speed, d.how = shared_latency.pending(cfg, ctx, pack.share, d.key)
    dense_speed = d.speed
    with evaluate.timing_lock(cache_dir, device) as lock:
        load = os.getloadavg()[0]
        speed = evaluate.speed(model, ctx)
    row.extra["latency_measurement"] = {
        "serialized": "timing lock per host and device: no sibling job timed at the same time",
        "dense": f"{d.how}, for the {pack.size} points of this packed job" if pack.reuse else d.how,
        "lock_waited_s": round(waited + lock["waited_s"], 3), "loadavg_1min": round(load, 2)}
    row.latency_ms_dense, row.latency_ms_dense_p90 = dense_speed.median_ms, dense_speed.p90_ms
    row.latency_ms, row.latency_ms_p90 = speed.median_ms, speed.p90_ms
    row.model_bytes_dense, row.model_bytes = dense_speed.model_bytes, speed.model_bytes
    row.extra["latency"] = {"dense": dense_speed.shapes, "compressed": speed.shapes}
    row.peak_mem_mb = evaluate.peak_memory_mb(device)
    if cfg.get("save_compressed"):
        from lrsweep.save import save_compressed

        metrics = {k: getattr(row, k) for k in ("task", "accuracy", "perplexity", "cosine_similarity", "recon_rel_err")}
        out = save_compressed(model, {r.name: r.factorization for r in results if r.factorization is not None},
                              Path(os.path.abspath(str(cfg.results_dir))) / "models" / row.run_id, tokenizer,
                              str(cfg.model.kind), metrics)
        row.extra["saved_model"] = str(out)
    row.wall_seconds = time.perf_counter() - t_all
    row.status = "ok"


def run(cfg: DictConfig, pack: Pack | None = None) -> ResultRow:
    """Run one grid point unless its row already says ok; return its row. ``pack``: the job's
    :class:`Pack` (a sweep's job); a pack of one by default."""
    pack = pack if pack is not None else Pack()
    results_dir = os.path.abspath(str(cfg.results_dir))
    rid = identity.run_id(cfg)
    if row_status(results_dir, rid) == "ok" and not cfg.get("force", False):
        log.info(f"[lrsweep] {rid} already ok, skipped")
        return read_row(row_path(results_dir, rid))
    validate(cfg)
    row = new_row(cfg)
    attempt = pack.attempt = Attempt(results_dir, rid)
    row.extra.update(attempt.earlier())  # earlier attempts, when requeued after preemption
    t0 = time.perf_counter()
    try:
        execute(cfg, row, pack, attempt)
    except Exception as e:  # any failure of the job becomes a failed row
        row.fail(e)
        row.wall_seconds = time.perf_counter() - t0
        log.error(f"[lrsweep] {rid} failed: {type(e).__name__}: {e}")
    pack.release(row.device or "cpu")
    row.finished_at = now()
    path = write_row(results_dir, row)
    attempt.clear()
    pack.attempt = None
    log.info(f"[lrsweep] row {path} ({row.status})")
    logger.log_row(cfg, row)
    return row


def sweep_point(cfg: DictConfig, pack: Pack) -> str:
    """A sweep's grid point in its job (the task Hydra's run_job runs): "ok", or PointFailed with the
    row's error. A config error found only in the job (e.g. no GPU on this node) is a failed row too."""
    try:
        row = run(cfg, pack)
    except ConfigError as e:
        row = write_failed(cfg, e, traceback="")
    if row.status != "ok":
        raise PointFailed(f"{row.run_id}: {(row.error or {}).get('message', '')}")
    return "ok"
