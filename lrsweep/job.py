"""One grid point: load → compress → evaluate → write the row → log it to W&B.

Any exception after validation becomes a ``failed`` row with the traceback; the row is
written atomically before W&B sees it, so a logging problem never loses a result.

In a packed job (:func:`packed`, used by lrsweep.sweep.run_pack) the dense model is loaded,
measured (task.prepare, latency) and snapshotted once for the points that share it
(:func:`dense_key`); after each point its modules, weights, requires_grad flags and RNG state
are put back (:func:`_restore`), so a point runs on the same dense model as in its own job.
Latency is timed under a per-host, per-device lock in the cache dir, so sibling jobs on the
same cores never time at once; the row's ``extra["latency_measurement"]`` says how it was done.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import json
import os
import platform
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from lrsweep import allocate, atomic, checkpoint, evaluate, heal, identity, jobmain, logger, models, schedule, slurm
from lrsweep.compress import LayerResult
from lrsweep.context import Context
from lrsweep.row import ResultRow, now, row_status, write_row
from lrsweep.validate import resolve_device, validate

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit of the lrsweep checkout, looked up once a process (a packed job's points share it)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    """Python's and the main packages' versions (importlib.metadata, ~25 ms: looked up once a process)."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lrsweep", "torch", "transformers", "datasets", "hydra-core", "submitit", "wandb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def model_key(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the dense weights: resolved path, a hash of the weight files, dtype."""
    if cfg.model.get("random_init"):  # seeded random weights: the config and seed are the identity
        return {"random_init": OmegaConf.to_container(cfg.model, resolve=True)}
    path = Path(models.resolve_path(cfg.model))
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".gguf", ".bin"):
                h.update(f.name.encode() + str(f.stat().st_size).encode())
                with open(f, "rb") as fh:  # first and last MiB: cheap and changes with the file
                    h.update(fh.read(1 << 20))
                    fh.seek(max(0, f.stat().st_size - (1 << 20)))
                    h.update(fh.read())
    return {"path": str(path), "gguf_file": cfg.model.get("gguf_file"), "revision": cfg.model.get("revision"),
            "weights": h.hexdigest()[:16], "dtype": cfg.model.dtype}


def _submitit_job() -> Any:
    """The submitit JobEnvironment of this process, None outside a submitit job."""
    if os.environ.get("SUBMITIT_FOLDER") and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment()
    return None


def _slurm_fields(row: ResultRow) -> None:
    row.slurm_job_id, row.slurm_array_index = slurm.job_id(), slurm.array_index()
    env = _submitit_job()
    if env is not None:  # its log file
        row.log_path = str(env.paths.stdout)


def _job_id() -> str:
    """This process's submitit job id (SLURM or local), else its pid."""
    env = _submitit_job()
    return str(env.job_id) if env is not None else f"pid {os.getpid()}"


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
                    started_at=now(), git_sha=git_sha(), versions=versions(), host=socket.gethostname(),
                    config=OmegaConf.to_container(cfg, resolve=True))
    row.config.pop("hydra", None)
    _slurm_fields(row)
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


@dataclass
class Dense:
    """The dense model of a grid point and what is measured on it before compression."""

    key: str
    model: Any
    tokenizer: Any
    model_key: dict[str, Any]
    state: Any
    speed: Any  # None while a sibling job times it (pending_dense_speed)
    params: int
    rng: Any
    waited_s: float
    modules: dict[str, Any] = field(default_factory=dict)  # packed jobs: the originals, restored after a point
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    training: bool = False
    points: int = 0
    how: str = "measured in this job"  # how the dense latency was measured (row.extra.latency_measurement)


# the packed job running in this process: {"size": points in the job, "dense": Dense | None,
# "share": the sweep's folder for dense latencies shared by its jobs, or None; "taken_over": True
# while it runs a point of a sibling job (lrsweep.sweep.run_pack)}
PACK: dict[str, Any] = {}


@contextmanager
def packed(size: int, share: str | os.PathLike | None = None) -> Iterator[None]:
    """Run the grid points of one job sharing their dense model (the points of one dense_key).
    ``share``: a folder of this sweep's launch (lrsweep.sweep.run_pack) where the first job to time a
    dense model leaves its latency for the sweep's other jobs on the same host, device and threads."""
    PACK.clear()
    PACK.update(size=size, dense=None, share=share)
    try:
        yield
    finally:
        PACK.clear()


@contextmanager
def timing_lock(cfg: DictConfig, device: str, while_waiting: Callable[[], None] | None = None
                ) -> Iterator[dict[str, float]]:
    """Hold this host's and device's timing lock (``<cache_dir>/locks``): no sibling job times at once.
    When a sibling holds it, ``while_waiting`` (work this job does later anyway) runs before waiting."""
    d = Path(os.path.abspath(str(cfg.cache_dir))) / "locks"
    d.mkdir(parents=True, exist_ok=True)
    out = {"waited_s": 0.0}
    with open(d / f"timing-{socket.gethostname()}-{device.replace(':', '')}.lock", "a") as f:
        t0 = time.perf_counter()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if while_waiting is not None:
                while_waiting()
            fcntl.flock(f, fcntl.LOCK_EX)
        out["waited_s"] = time.perf_counter() - t0
        try:
            yield out
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_dense(cfg: DictConfig, device: str, cache_dir: str) -> Dense:
    model, tokenizer = models.load(cfg.model, device, cache_dir)
    jobmain.startup_done()  # a sweep's job: its libraries are imported, its model built; the collector back on
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"the loaded weights contain NaN/Inf ({name})")
    mkey = model_key(cfg)
    ctx = Context(cfg, tokenizer, device, cache_dir, mkey)
    task, state = evaluate.task_for(cfg), []

    def prepare() -> None:  # the dense task metrics: read from the cache, or computed (with the sibling jobs)
        if not state:
            state.append(task.prepare(model, ctx))

    # timed first: a job that finds a sibling timing does its prepare meanwhile, and on a cold cache
    # the sibling joins that work once it is done timing (cache.shared_parts), instead of one job
    # computing the dense metrics while the other waits for them and then for the timing
    speed, how, waited = _dense_speed(cfg, model, ctx, while_waiting=lambda: (prepare(), logger.prepare(cfg)))
    prepare()
    return Dense(dense_key(cfg), model, tokenizer, mkey, state[0], speed, sum(p.numel() for p in model.parameters()),
                 torch.get_rng_state(), waited, how=how)


def _dense_speed(cfg: DictConfig, model: Any, ctx: Context, while_waiting: Callable[[], None] | None = None
                 ) -> tuple[evaluate.Speed | None, str, float]:
    """(the dense model's latency, how it was measured, seconds waited for the timing lock).

    In a packed job of a sweep (``PACK["share"]``) one job per host, device, thread count and dense
    model (dense_key) times it, holding that model's lock in the share folder, and leaves the figure
    there for the others. A job that finds it there reads it; one that finds a sibling timing it
    does not wait: None, read by :func:`pending_dense_speed` when its first row needs it (the job
    compresses and evaluates meanwhile, and can take over points of the timing job: lrsweep.sweep)."""
    share = PACK.get("share")
    if not share:
        return _timed_here(cfg, model, ctx, while_waiting)
    path = _speed_path(cfg, ctx, share)
    found = _read_speed(path)
    if found is not None:
        return (*found, 0.0)
    lock = FileLock(f"{path}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:  # a sibling job is timing this dense model now
        return None, "pending", 0.0
    except OSError as e:  # the share folder is not writable: time it here, unshared
        log.warning(f"[lrsweep] dense latency not shared ({e})")
        return _timed_here(cfg, model, ctx, while_waiting)
    try:
        found = _read_speed(path)
        if found is not None:
            return (*found, 0.0)
        with timing_lock(cfg, ctx.device, while_waiting) as timed:
            speed = evaluate.speed(model, ctx)
        return (*_write_speed(path, speed), timed["waited_s"])
    finally:
        lock.release()


def _timed_here(cfg: DictConfig, model: Any, ctx: Context, while_waiting: Callable[[], None] | None
                ) -> tuple[evaluate.Speed, str, float]:
    with timing_lock(cfg, ctx.device, while_waiting) as lock:
        return evaluate.speed(model, ctx), "measured in this job", lock["waited_s"]


def pending_dense_speed(cfg: DictConfig, d: Dense, ctx: Context) -> None:
    """Fill in the dense latency a sibling job was timing when this one loaded the model: wait for its
    lock and read the figure; if the sibling died before writing it, time a fresh copy of the dense
    model here (this job's own is compressed by now)."""
    path = _speed_path(cfg, ctx, PACK["share"])
    with FileLock(f"{path}.lock"):
        found = _read_speed(path)
        if found is None:
            model, _ = models.load(cfg.model, ctx.device, ctx.cache_dir)
            with timing_lock(cfg, ctx.device):
                speed = evaluate.speed(model, ctx)
            del model
            found = _write_speed(path, speed)
    d.speed, d.how = found


def _speed_path(cfg: DictConfig, ctx: Context, share: str | os.PathLike) -> Path:
    host, threads = socket.gethostname(), torch.get_num_threads()
    key = hashlib.sha256(json.dumps([dense_key(cfg), host, ctx.device, threads]).encode()).hexdigest()[:16]
    return Path(share) / f"dense-speed-{key}.json"


def _read_speed(path: Path) -> tuple[evaluate.Speed, str] | None:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return evaluate.Speed(**kept["speed"]), _shared_how(kept["host"], kept["threads"], kept["job"])


def _write_speed(path: Path, speed: evaluate.Speed) -> tuple[evaluate.Speed, str]:
    host, threads, job = socket.gethostname(), torch.get_num_threads(), _job_id()
    try:
        atomic.write_json(path, {"speed": dataclasses.asdict(speed), "job": job, "host": host, "threads": threads})
    except OSError as e:  # the other jobs time it themselves
        log.warning(f"[lrsweep] dense latency not shared ({e})")
        return speed, "measured in this job"
    return speed, _shared_how(host, threads, job)


def _shared_how(host: str, threads: int, job: str) -> str:
    return f"measured once for this sweep's jobs on {host} ({threads} threads) by job {job}"


def dense(cfg: DictConfig, device: str, cache_dir: str) -> Dense:
    """The loaded, measured dense model: in a packed job, the one of the previous point when it shares it."""
    if not PACK:
        return _load_dense(cfg, device, cache_dir)
    d = PACK.get("dense")
    if d is None or d.key != dense_key(cfg):
        PACK["dense"] = None
        d = _load_dense(cfg, device, cache_dir)
        d.modules = dict(d.model.named_modules())
        d.weights = {k: v.detach().to("cpu", copy=True) for k, v in d.model.state_dict(keep_vars=True).items()}
        d.requires_grad = {n: p.requires_grad for n, p in d.model.named_parameters()}
        d.training = d.model.training
        PACK["dense"] = d
    else:
        torch.set_rng_state(d.rng)  # as right after the dense measurements in a job of its own
    d.points += 1
    return d


@torch.no_grad()
def _restore(d: Dense, device: str) -> None:
    """Put the packed job's dense model back as loaded: modules, weights, requires_grad, mode."""
    for name, module in d.modules.items():  # parents first: each original parent gets its original children
        if name:
            parent, _, attr = name.rpartition(".")
            if getattr(d.modules[parent], attr, None) is not module:
                setattr(d.modules[parent], attr, module)
    d.model.to(device)
    d.model.load_state_dict(d.weights, strict=True)
    for n, p in d.model.named_parameters():
        p.requires_grad_(d.requires_grad[n])
    d.model.train(d.training)
    if set(dict(d.model.named_modules())) != set(d.modules):  # something we cannot undo: load again next time
        PACK["dense"] = None


def release(device: str) -> None:
    """After a point of a packed job (ok or failed): restore the dense model for the next one."""
    d = PACK.get("dense")
    if d is not None:
        try:
            _restore(d, device)
        except Exception as e:  # the next point loads the model again
            log.warning(f"[lrsweep] dense model not restored ({e}); the next point reloads it")
            PACK["dense"] = None


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


def execute(cfg: DictConfig, row: ResultRow) -> None:
    """Fill ``row`` with the measurements of this grid point (raises on failure)."""
    t_all = time.perf_counter()
    device = resolve_device(str(cfg.device))
    row.device = device
    if device.startswith("cuda"):
        row.gpu_name = torch.cuda.get_device_name(device)
    _threads(cfg)
    torch.manual_seed(int(cfg.seed))
    cache_dir = os.path.abspath(str(cfg.cache_dir))
    checkpoint.stage("load")
    d = dense(cfg, device, cache_dir)
    model, tokenizer, state = d.model, d.tokenizer, d.state
    ctx = Context(cfg, tokenizer, device, cache_dir, d.model_key)
    task = evaluate.task_for(cfg)
    row.params_dense = d.params
    if PACK:
        row.extra["packed"] = {"job_points": PACK["size"], "point": d.points, "dense_reused": d.points > 1,
                               **({"taken_over": True} if PACK.get("taken_over") else {})}  # a sibling job's point

    layers = models.target_modules(model, cfg.model.targets)
    before = heal.snapshot(model) if cfg.get("heal") else {}
    checkpoint.stage("compress", layers=len(layers))
    t0 = time.perf_counter()
    results, schedule_info = schedule.compress(model, layers, ctx, progress=bool(cfg.get("progress", True)))
    row.compress_seconds = time.perf_counter() - t0
    allocate.record(row, cfg, results, schedule_info.pop("allocation", None))
    if schedule_info:
        row.extra["stream" if schedule_info.get("stream") else "calib"] = schedule_info
    if cfg.get("heal"):
        checkpoint.stage("heal")
        _heal(model, heal.replaced(before, model), results, ctx, task, state, row)

    _size_fields(row, results)
    row.params_compressed = sum(p.numel() for p in model.parameters())
    row.extra["layer_ranks"] = {r.name: r.rank for r in results}
    row.extra["layer_seconds"] = {r.name: round(r.seconds, 4) for r in results}
    info = {r.name: r.info for r in results if r.info}
    if info:  # method details per layer (solver, Cholesky shift, a_shape, nnz, ...)
        row.extra["method_info"] = json.loads(json.dumps(info, default=str))

    checkpoint.stage("evaluate")
    waited = 0.0
    if evaluate.times_layers(cfg):  # layers are timed (and fall back) under the lock too
        with timing_lock(cfg, device) as lock:
            row.extra.update(evaluate.layer_fallback(model, [r.name for r in results], ctx))
        waited = lock["waited_s"]
    for key, value in task.evaluate(model, ctx, state).items():
        if key == "extra":
            row.extra.update(value)
        else:
            setattr(row, key, value)
    if d.speed is None:  # a sibling job was timing the dense model: its figure, now that this row needs it
        pending_dense_speed(cfg, d, ctx)
    dense_speed = d.speed
    with timing_lock(cfg, device) as lock:
        load = os.getloadavg()[0]
        speed = evaluate.speed(model, ctx)
    row.extra["latency_measurement"] = {
        "serialized": "timing lock per host and device: no sibling job timed at the same time",
        "dense": f"{d.how}, for the {PACK['size']} points of this packed job" if PACK else d.how,
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


def run(cfg: DictConfig) -> ResultRow:
    """Run one grid point unless its row already says ok; return its row."""
    results_dir = os.path.abspath(str(cfg.results_dir))
    rid = identity.run_id(cfg)
    if row_status(results_dir, rid) == "ok" and not cfg.get("force", False):
        from lrsweep.row import read_row, row_path

        log.info(f"[lrsweep] {rid} already ok, skipped")
        return read_row(row_path(results_dir, rid))
    validate(cfg)
    row = new_row(cfg)
    row.extra.update(checkpoint.begin(results_dir, rid))  # earlier attempts, when requeued after preemption
    t0 = time.perf_counter()
    try:
        execute(cfg, row)
    except Exception as e:  # any failure of the job becomes a failed row
        row.fail(e)
        row.wall_seconds = time.perf_counter() - t0
        log.error(f"[lrsweep] {rid} failed: {type(e).__name__}: {e}")
    release(row.device or "cpu")
    row.finished_at = now()
    path = write_row(results_dir, row)
    checkpoint.clear(results_dir, rid)
    log.info(f"[lrsweep] row {path} ({row.status})")
    logger.log_row(cfg, row)
    return row
