"""The compression schedule: which target layers are compressed when, with which statistics, where.

  whole       every target layer at once: with the statistics of the dense model (computed once,
              cached: :mod:`lrsweep.calib`) for a method that ``needs`` some, with no calibration
              at all for one that needs none;
  sequential  (``calib.sequential=true``, methods with statistics) block by block (:func:`lrsweep.models.blocks`),
              each block's statistics taken from the model whose earlier blocks are already
              compressed (as SVD-LLM / GPTQ do); those depend on the method, so they are not cached;
              a method that wants ``LayerStats.shifted`` (svdllm's update) is compressed so too,
              with the dense model's statistics (cached) and the shifted ones beside them;
  streamed    (``stream=true``) the model waits on CPU and one block at a time is on ``ctx.device``;
              the statistics come from the block's inputs, propagated from block to block on the
              device (GPTQ-style), through the dense block or, sequential, the compressed one.
A rank allocation (:mod:`lrsweep.allocate`) runs before a whole or streamed compression, and before a
shifted one's blocks (on the dense model's statistics); the compressed model is on ``ctx.device`` afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch
from torch import nn

from lrsweep import calib
from lrsweep.allocate import allocate
from lrsweep.allocate import scope as allocation_scope
from lrsweep.compress import LayerResult, compress_model, method_options, method_spec
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.methods import LayerStats, MethodSpec
from lrsweep.evaluate.latency import reset_peak
from lrsweep.models import blocks


def compress(model: nn.Module, layers: dict[str, nn.Module], ctx: Context,
             progress: bool = True) -> tuple[list[LayerResult], dict[str, Any]]:
    """Compress ``layers`` on the schedule ``ctx.cfg`` asks for; (layer results, info for the row:
    calibration, per-block figures when streamed, ``allocation`` when one ran)."""
    cfg = ctx.cfg
    spec = method_spec(cfg.method)
    needs, shifted = spec.needs, spec.wants_shifted(**method_options(cfg.method))
    alloc: dict[str, Any] = {}
    if cfg.get("stream", False):
        model.to("cpu")  # one block at a time goes to the device
        ranks, alloc = allocate(model, layers, ctx, None)  # only for methods without statistics (validate)
        results, info = streamed(model, layers, ctx, needs, ranks)
    elif spec.prepare is not None:  # trains on the calibration data first (dobi_svd); no allocation (validate)
        results, info = prepared(model, layers, ctx, spec)
    elif needs and (cfg.calib.get("sequential", False) or shifted):  # allocation only when shifted (validate)
        results, info, alloc = sequential(model, layers, ctx, needs, shifted)
    else:
        stats, info = calib.layer_stats(model, layers, ctx, needs) if needs else (None, {})
        with allocation_scope(cfg):  # the allocation's SVDs are the ones the compression truncates
            ranks, alloc = allocate(model, layers, ctx, stats)
            results = compress_model(model, layers, cfg, stats=stats, progress=progress, ranks=ranks,
                                     offload=offload(ctx))
    if alloc:
        info = {**info, "allocation": alloc}
    model.to(ctx.device)  # streamed: the model waited on CPU
    return results, info


def offload(ctx: Context) -> str | None:
    """Where the dense layers that compression replaces wait: on CPU when the model is compressed on
    another device. They are kept (``layers``; heal's teacher, which moves them back while it trains; a
    packed job's restore), but the compressed model must not hold them on the GPU beside itself:
    streamed, every block's would pile up there; whole, dense and compressed layers would both be there."""
    return None if ctx.device == "cpu" else "cpu"


def check(cfg: Any, spec: MethodSpec, opts: dict[str, Any]) -> None:
    """ConfigError (before launch) for a schedule the method cannot run on."""
    if spec.prepare is not None:
        _check_prepared(cfg, spec)
    if not spec.wants_shifted(**opts):
        return
    if cfg.get("stream", False):
        raise ConfigError("stream", f"method {spec.name} with these options refits each layer to the inputs of "
                          "its compressed predecessors beside the dense model's statistics; stream=true holds "
                          "only one of them", ["stream=false"])


def _check_prepared(cfg: Any, spec: MethodSpec) -> None:
    if not cfg.get("calib"):
        raise ConfigError("calib", f"method {spec.name} trains on calibration data, but none is configured",
                          ["+calib=default", "+calib=<name>"])
    if cfg.get("param_ratio") is None:
        raise ConfigError("param_ratio", f"method {spec.name} trains its ranks towards a param_ratio; set it",
                          ["param_ratio=<fraction kept>"])
    for key, bad, valid in (("stream", cfg.get("stream", False), "stream=false"),
                            ("calib.sequential", cfg.calib.get("sequential", False), "calib.sequential=false"),
                            ("allocation", cfg.get("allocation", "uniform") != "uniform", "uniform")):
        if bad:
            raise ConfigError(key, f"method {spec.name} trains all its ranks at once on the whole model", [valid])


def prepared(model: nn.Module, layers: dict[str, nn.Module], ctx: Context,
             spec: MethodSpec) -> tuple[list[LayerResult], dict[str, Any]]:
    """The method's ``prepare`` on the calibration batches (its stats and ranks), then the compression."""
    cfg = ctx.cfg
    batches, _ = calib.calibration(model, ctx, ())
    batches = [calib.to_device(b, ctx.device) for b in batches]
    loss_fn = calib.SOURCES[cfg.model.kind].loss(model, batches, ctx.device)
    t0 = time.perf_counter()
    stats, ranks, info = spec.prepare(model, layers, batches, loss_fn, float(cfg.param_ratio),
                                      **method_options(cfg.method))
    results = compress_model(model, layers, cfg, stats=stats, progress=False, ranks=ranks, offload=offload(ctx))
    return results, {"prepared": info, "stats": [], "cache_hit": False,
                     "seconds": round(time.perf_counter() - t0, 3)}


def sequential(model: nn.Module, layers: dict[str, nn.Module], ctx: Context, needs: tuple[str, ...],
               shifted: bool = False) -> tuple[list[LayerResult], dict[str, Any], dict[str, Any]]:
    """Block by block, each block's statistics from the model with the earlier blocks compressed;
    ``shifted``: those go to ``LayerStats.shifted`` beside the dense model's (unless calib.sequential).
    Returns the layer results, the calibration info and the allocation's.

    A rank allocation (``shifted`` only) runs first on the dense model's statistics, each layer's
    shifted inputs taken to be its dense ones (no predecessor compressed yet): the ranks are chosen and
    checked on the method without its refit, whose spectrum the refit does not change (svdllm's update
    keeps the right factor and refits U). The blocks are then compressed at the ranks that ship.

    Without the Fisher the block inputs are carried from block to block (:class:`Propagation`): one
    pass through each block, where a pass through the whole model per block costs as many model
    passes as there are blocks. The Fisher needs a backward pass through the whole model per block."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    dense, extra = calib.layer_stats(model, layers, ctx, needs) \
        if shifted and not cfg.calib.get("sequential", False) else (None, {})
    with contextlib.ExitStack() as scope:
        ranks, alloc = None, {}
        if dense is not None and cfg.get("allocation", "uniform") != "uniform":
            scope.enter_context(allocation_scope(cfg))  # the compression truncates the allocation's SVDs
            unshifted = {n: dataclasses.replace(s, shifted=s) for n, s in dense.items()}  # held: memo keys use ids
            ranks, alloc = allocate(model, layers, ctx, unshifted)
        results, info = _blocks_in_turn(model, layers, ctx, needs, dense, shifted, ranks)
    if dense is not None:
        info = {**info, "shifted": True, "dense_cache_hit": extra["cache_hit"], "dense_seconds": extra["seconds"]}
    info["total_seconds"] = round(time.perf_counter() - t0, 3)
    return results, info, alloc


def _blocks_in_turn(model: nn.Module, layers: dict[str, nn.Module], ctx: Context, needs: tuple[str, ...],
                    dense: dict[str, LayerStats] | None, shifted: bool,
                    ranks: dict[str, int] | None) -> tuple[list[LayerResult], dict[str, Any]]:
    cfg = ctx.cfg
    batches, loss_fn = calib.calibration(model, ctx, needs)
    carried = None if "fisher" in needs else Propagation(model, layers, batches, ctx.device)
    results, calib_seconds = [], 0.0
    for name, block in blocks(layers).items():
        t1 = time.perf_counter()
        if carried is None:
            stats = calib.collect(model, block, batches, needs, ctx.device, loss_fn, calib.fisher_estimator(cfg))
        else:
            stats = carried.stats(model.get_submodule(name), block, needs)
        calib_seconds += time.perf_counter() - t1
        if shifted:
            stats = {n: dataclasses.replace(dense[n] if dense else s, shifted=s) for n, s in stats.items()}
        results += compress_model(model, block, cfg, stats=stats, progress=False, ranks=ranks, offload=offload(ctx))
        if carried is not None:
            t1 = time.perf_counter()
            carried.advance(model.get_submodule(name))  # the next block's inputs through this block, compressed
            calib_seconds += time.perf_counter() - t1
    return results, {"cache_hit": False, "sequential": True, "stats": sorted(needs), **calib.estimator_info(cfg, needs),
                     "propagated": carried is not None, "seconds": round(calib_seconds, 3)}


# ---------------------------------------------------------------- streamed: one block at a time on the device
class _Caught(Exception):
    pass


def _move(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _first_block_inputs(model: nn.Module, first: nn.Module, batches: list[dict]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives for each batch: the model runs (where it is) up to it."""
    caught = []

    def hook(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Caught

    where = str(next(model.parameters()).device)
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no KV cache shared across batches
    try:
        for batch in batches:
            try:
                with torch.no_grad():
                    model(**{k: v for k, v in calib.to_device(batch, where).items() if k != "labels"})
            except _Caught:
                pass
    finally:
        handle.remove()
        model.config.use_cache = use_cache
    return caught


def _run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class Propagation:
    """The inputs each block receives over the calibration batches, carried from block to block
    (GPTQ-style): the first block's from one run of the model up to it, each later block's from the
    outputs of the one before. They live on ``device``, one set at a time."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], batches: list[dict], device: str):
        first = model.get_submodule(next(iter(blocks(layers))))
        self.device = device
        self.inputs = [_move(x, device) for x in _first_block_inputs(model, first, batches)]
        self.masks = [b.get("attention_mask") for b in batches]
        self.outputs: list[torch.Tensor] = []

    @torch.no_grad()
    def stats(self, block: nn.Module, block_layers: dict[str, nn.Module], needs: tuple[str, ...],
              keep_outputs: bool = False) -> dict[str, LayerStats]:
        """Statistics of ``block_layers``' inputs while ``block`` runs on the carried inputs;
        ``keep_outputs``: its outputs are kept for :meth:`advance` (the dense block's)."""
        acc = calib.stats.Accumulator(block_layers, needs)
        self.outputs = []
        try:
            for (args, kwargs), mask in zip(self.inputs, self.masks, strict=True):
                acc.mask = mask.reshape(-1).bool().to(self.device) if mask is not None else None
                out = _run_block(block, args, kwargs)
                if keep_outputs:
                    self.outputs.append(out)
        finally:
            acc.remove()
        return acc.result()

    @torch.no_grad()
    def advance(self, block: nn.Module | None = None) -> None:
        """The next block's inputs: ``block``'s outputs (as it is now: compressed), or the outputs
        :meth:`stats` kept when ``block`` is None. One batch at a time replaces its inputs."""
        for i, (args, kwargs) in enumerate(self.inputs):
            out = _run_block(block, args, kwargs) if block is not None else self.outputs[i]
            self.inputs[i] = _with_hidden(args, kwargs, out)
        self.outputs = []


@torch.no_grad()
def streamed(model: nn.Module, layers: dict[str, nn.Module], ctx: Context, needs: tuple[str, ...],
             ranks: dict[str, int] | None = None) -> tuple[list[LayerResult], dict[str, Any]]:
    """Compress block by block with only the current block on ``ctx.device`` (the model waits on CPU).

    Statistics (xtx, absmean) come from the block's inputs, propagated from block to block on the
    device (GPTQ-style): through the dense block, or the compressed one with ``calib.sequential``.
    Returns the layer results and, per block, seconds and peak device memory.
    """
    cfg, device = ctx.cfg, ctx.device
    if "fisher" in needs:
        raise ValueError("stream=true propagates activations block by block; fisher needs a backward pass "
                         "through the whole model (use stream=false)")
    carried = Propagation(model, layers, calib.calibration(model, ctx, needs)[0], device) if needs else None
    sequential = bool(cfg.calib.get("sequential", False)) if needs else False
    cuda = device.startswith("cuda")
    results, per_block = [], {}
    for name, block_layers in blocks(layers).items():
        block = model.get_submodule(name)
        if cuda:
            reset_peak(device)  # a peak per block; the job's peak (the dense evaluation's) is kept
        t0 = time.perf_counter()
        block.to(device)
        stats = carried.stats(block, block_layers, needs, keep_outputs=not sequential) if carried else None
        results += compress_model(model, block_layers, cfg, stats=stats, progress=False, ranks=ranks,
                                  offload=offload(ctx))
        if carried is not None:  # the next block sees this one compressed (sequential) or dense
            carried.advance(block if sequential else None)
        block.to("cpu")
        if cuda:
            torch.cuda.synchronize(device)
        per_block[name] = {"seconds": round(time.perf_counter() - t0, 3), "layers": len(block_layers)}
        if cuda:
            per_block[name]["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    info: dict[str, Any] = {"stream": True, "device": device, "blocks": per_block}
    if cuda:
        info["peak_mem_mb"] = max(b["peak_mem_mb"] for b in per_block.values())
    if needs:
        info.update(stats=sorted(needs), sequential=sequential, cache_hit=False)
    return results, info
