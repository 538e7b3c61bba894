"""The dense model's latency, timed once for the jobs of one sweep launch on one host.

In a packed job of a sweep (:attr:`lrsweep.pack.Pack.share`: the launch's folder) one job per
host, device, thread count and dense model (lrsweep.job.dense_key) times it, holding that
model's lock in the share folder, and leaves the figure there for the others. A job that finds it
there reads it; one that finds a sibling timing it does not wait (:func:`dense_speed` returns None)
and reads it when its first row needs it (:func:`pending`), having compressed and evaluated
meanwhile. Timing itself is serialized per host and device (lrsweep.evaluate.timing_lock).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig

from lrsweep import atomic, evaluate, models, provenance
from lrsweep.context import Context

log = logging.getLogger(__name__)

HERE = "measured in this job"


def dense_speed(cfg: DictConfig, model: Any, ctx: Context, share: str | os.PathLike | None, key: str,
                while_waiting: Callable[[], None] | None = None) -> tuple[evaluate.Speed | None, str, float]:
    """(the dense model's latency or None while a sibling times it, how it was measured, seconds waited
    for the timing lock). ``share``: the launch's folder (None: time it here); ``key``: the dense key."""
    if not share:
        return timed_here(ctx, model, while_waiting)
    path = _path(ctx, share, key)
    found = _read(path)
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
        return timed_here(ctx, model, while_waiting)
    try:
        found = _read(path)
        if found is not None:
            return (*found, 0.0)
        with evaluate.timing_lock(ctx.cache_dir, ctx.device, while_waiting) as timed:
            speed = evaluate.speed(model, ctx)
        return (*_write(path, speed), timed["waited_s"])
    finally:
        lock.release()


def timed_here(ctx: Context, model: Any, while_waiting: Callable[[], None] | None = None
               ) -> tuple[evaluate.Speed, str, float]:
    with evaluate.timing_lock(ctx.cache_dir, ctx.device, while_waiting) as lock:
        return evaluate.speed(model, ctx), HERE, lock["waited_s"]


def pending(cfg: DictConfig, ctx: Context, share: str | os.PathLike, key: str) -> tuple[evaluate.Speed, str]:
    """The dense latency a sibling job was timing when this one loaded the model: wait for its lock and
    read the figure; if the sibling died before writing it, time a fresh copy of the dense model here
    (this job's own is compressed by now)."""
    path = _path(ctx, share, key)
    with FileLock(f"{path}.lock"):
        found = _read(path)
        if found is None:
            model, _ = models.load(cfg.model, ctx.device, ctx.cache_dir)
            with evaluate.timing_lock(ctx.cache_dir, ctx.device):
                speed = evaluate.speed(model, ctx)
            del model
            found = _write(path, speed)
    return found


def _path(ctx: Context, share: str | os.PathLike, key: str) -> Path:
    host, threads = socket.gethostname(), torch.get_num_threads()
    digest = hashlib.sha256(json.dumps([key, host, ctx.device, threads]).encode()).hexdigest()[:16]
    return Path(share) / f"dense-speed-{digest}.json"


def _read(path: Path) -> tuple[evaluate.Speed, str] | None:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return evaluate.Speed(**kept["speed"]), _how(kept["host"], kept["threads"], kept["job"])


def _write(path: Path, speed: evaluate.Speed) -> tuple[evaluate.Speed, str]:
    host, threads, job = socket.gethostname(), torch.get_num_threads(), provenance.job_id()
    try:
        atomic.write_json(path, {"speed": dataclasses.asdict(speed), "job": job, "host": host, "threads": threads})
    except OSError as e:  # the other jobs time it themselves
        log.warning(f"[lrsweep] dense latency not shared ({e})")
        return speed, HERE
    return speed, _how(host, threads, job)


def _how(host: str, threads: int, job: str) -> str:
    return f"measured once for this sweep's jobs on {host} ({threads} threads) by job {job}"
