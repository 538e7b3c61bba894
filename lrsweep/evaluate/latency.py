"""Latency and memory, dense vs compressed, measured in the same job (``eval.latency``, ``inference``).

  speed           whole-model forward latency (median, p90) at every configured shape, and the
                  model's bytes in memory;
  peak_memory_mb  the process's peak memory (CUDA allocations on a GPU, resident set on CPU);
  layer_fallback  each compressed layer timed against its dense equivalent; with
                  ``inference.fallback=auto`` the faster one stays;
  timing_lock     one timing at a time per host and device, across the jobs of every sweep.
"""

from __future__ import annotations

import fcntl
import functools
import os
import resource
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.factorization import dense_linear


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median and p90 wall time (ms) of ``fn`` after ``warmup`` calls, synchronizing CUDA around each."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(times), "p90": float(torch.tensor(times).quantile(0.9))}


def _shapes(lcfg: DictConfig) -> list[tuple[int, int]]:
    """(batch, tokens): the primary shape first, then ``latency.shapes`` (e.g. decode-like 1 token)."""
    out = [(int(lcfg.batch_size), int(lcfg.seq_len))]
    for b, t in lcfg.get("shapes") or []:
        if (int(b), int(t)) not in out:
            out.append((int(b), int(t)))
    return out


@dataclass
class Speed:
    median_ms: float  # of the primary shape (eval.latency.batch_size x seq_len)
    p90_ms: float
    shapes: dict[str, dict[str, float]]  # "b<batch>xt<tokens>" -> {median, p90}
    model_bytes: int  # parameters and buffers in memory


@torch.no_grad()
def speed(model: nn.Module, ctx: Context) -> Speed:
    """Whole-model forward latency at every configured shape, and the model's bytes in memory."""
    lcfg = ctx.cfg.eval.latency
    vocab = getattr(ctx.tokenizer, "vocab_size", 1000)
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = min(vocab, getattr(table, "num_embeddings", vocab))  # ids the model has rows for
    gen = torch.Generator().manual_seed(0)
    shapes = {}
    for b, t in _shapes(lcfg):
        ids = torch.randint(0, vocab, (b, t), generator=gen).to(ctx.device)
        shapes[f"b{b}xt{t}"] = timed(functools.partial(model, input_ids=ids), ctx.device, int(lcfg.warmup),
                                    int(lcfg.repeats))
    first = next(iter(shapes.values()))
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return Speed(first["median"], first["p90"], shapes, nbytes)


_CUDA_PEAK: dict[str, int] = {}  # device -> the process's peak allocation before its last reset_peak


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU."""
    if device.startswith("cuda"):
        return max(_CUDA_PEAK.get(device, 0), torch.cuda.max_memory_allocated(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak(device: str) -> None:
    """Start CUDA's peak-allocation counter afresh (a peak of one stage, e.g. a streamed block) without
    losing the process's peak that :func:`peak_memory_mb` reports (the dense model's evaluation, say)."""
    _CUDA_PEAK[device] = max(_CUDA_PEAK.get(device, 0), torch.cuda.max_memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- per-layer latency, dense fallback
@torch.no_grad()
def as_dense(module: nn.Module, device: str) -> nn.Linear:
    """The nn.Linear computing the same affine map as ``module`` (W_hat from the identity, bias from 0)."""
    p = next(module.parameters())
    d = module.in_features
    eye = torch.eye(d, device=device, dtype=p.dtype)
    bias = module(torch.zeros(1, d, device=device, dtype=p.dtype))[0]
    W = (module(eye) - bias).T
    has_bias = bias.abs().max() > 0
    return dense_linear(W, bias if has_bias else None, p.dtype)


def check_inference(cfg: DictConfig) -> str:
    """``inference.fallback`` (off | auto); ConfigError for anything else."""
    mode = str((cfg.get("inference") or {}).get("fallback", "off"))
    if mode not in ("off", "auto"):
        raise ConfigError("inference.fallback", f"{mode!r} is unknown", ["off", "auto"])
    return mode


def times_layers(cfg: DictConfig) -> bool:
    """Whether :func:`layer_fallback` times layers (``inference.fallback=auto`` or ``eval.latency.per_layer``)."""
    return check_inference(cfg) == "auto" or bool(cfg.eval.latency.get("per_layer", False))


@torch.no_grad()
def layer_fallback(model: nn.Module, names: list[str], ctx: Context) -> dict[str, Any]:
    """Time each compressed layer against its dense equivalent on the primary shape's tokens.

    With ``inference.fallback=auto`` a layer whose dense equivalent is faster is replaced by it
    (same W_hat, so the metrics do not change; its memory becomes n x d). Returns the row extras:
    ``layer_latency`` {name: {factorized_ms, dense_ms}} and ``fallback_layers``.
    """
    from lrsweep.models import set_module

    if not times_layers(ctx.cfg):
        return {}
    mode = check_inference(ctx.cfg)
    lcfg = ctx.cfg.eval.latency
    tokens = int(lcfg.batch_size) * int(lcfg.seq_len)
    timings, fell_back = {}, []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear) or not hasattr(module, "in_features"):
            continue  # already dense (e.g. a method that stores a dense matrix)
        p = next(module.parameters())
        x = torch.randn(tokens, module.in_features, device=ctx.device, dtype=p.dtype)
        dense = as_dense(module, ctx.device)
        fact = timed(functools.partial(module, x), ctx.device, int(lcfg.warmup), int(lcfg.repeats))["median"]
        dns = timed(functools.partial(dense, x), ctx.device, int(lcfg.warmup), int(lcfg.repeats))["median"]
        timings[name] = {"factorized_ms": round(fact, 4), "dense_ms": round(dns, 4)}
        if mode == "auto" and dns < fact:
            set_module(model, name, dense)
            fell_back.append(name)
    out: dict[str, Any] = {"layer_latency": timings, "layer_latency_tokens": tokens}
    if mode == "auto":
        out["fallback_layers"] = fell_back
    return out


@contextmanager
def timing_lock(cache_dir: str | os.PathLike, device: str, while_waiting: Callable[[], None] | None = None
                ) -> Iterator[dict[str, float]]:
    """Hold this host's and device's timing lock (``<cache_dir>/locks``): no sibling job times at once.
    When a sibling holds it, ``while_waiting`` (work this job does later anyway) runs before waiting.
    Yields ``{"waited_s": seconds waited}``."""
    d = Path(os.path.abspath(str(cache_dir))) / "locks"
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
