"""Calibration statistics of the target layers, collected in one pass and cached on disk.

For every target ``nn.Linear`` (only the statistics the method ``needs``; target embeddings read
token ids and get none, see :func:`linears`):
  xtx      sum of x xᵀ over the calibration tokens of the layer input (d x d, fp64);
  absmean  mean |x| per input channel (fp64);
  fisher   the empirical Fisher of the weight, Σ (∂loss/∂W)² (n x d; fp64 accumulation, stored fp32),
           estimated as ``calib.fisher`` says (:data:`FISHER`):
             sample  Σ over calibration samples of the squared gradient of each sample's own loss
                     (FWSVD: Ĩ_W = 1/|D| Σ_i (∂L(d_i)/∂W)²); exact per-sample gradients of a Linear
                     weight, G_b = g_bᵀ x_b from the layer input x_b (forward hook) and the gradient
                     g_b of its output (tensor hook), in the same single backward pass per batch;
             batch   Σ over calibration batches of the squared gradient of the batch's mean loss
                     (lrsweep's estimator before issue #13; what it costs less: README);
  n_tokens tokens seen (padding excluded).
Inputs come from forward hooks, gradients from one backward pass per batch over the same forward;
the batches and the loss come from the model kind's source (:mod:`lrsweep.calib.sources`).

Statistics are cached with :mod:`lrsweep.cache` keyed by the model key (path, weight-file
hash, dtype), the calibration source, sample count, sequence length, seed, batch size,
targets and the statistics collected: the first job of a sweep computes, the others read.
Statistics taken block by block from a partly compressed model (``calib.sequential``, see
:mod:`lrsweep.schedule`) depend on the method, so they are not cached.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import cache, data
from lrsweep.calib.sources import SAMPLERS, SOURCES, Batch, LossFn, to_device
from lrsweep.context import Context
from lrsweep.methods import LayerStats

CACHE_VERSION = 2  # 2: statistics shared by layers reading the same input are stored once
FISHER = ("sample", "batch")  # calib.fisher: the estimator of the Fisher (module docstring)


# ---------------------------------------------------------------- one pass with hooks
def linears(layers: dict[str, nn.Module]) -> dict[str, nn.Linear]:
    """The Linear modules of ``layers``: the only targets with input statistics (hooks go on these only)."""
    return {name: m for name, m in layers.items() if isinstance(m, nn.Linear)}


class Accumulator:
    """Forward hooks summing xᵀx and |x| of each layer's input over the real (unpadded) tokens.

    Layers that read the very tensor the previously hooked layer read (q/k/v, gate/up) share
    that layer's statistics: computed once, held and cached once.
    """

    def __init__(self, layers: dict[str, nn.Module], needs: tuple[str, ...]):
        layers = linears(layers)
        self.needs, self.mask = needs, None
        self.xtx: dict[str, torch.Tensor] = {}
        self.abssum: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.n_tokens = dict.fromkeys(layers, 0)
        self.shares: dict[str, str] = {}  # layer -> the layer whose input (and statistics) it shares
        self._last: tuple[str, torch.Tensor] | None = None  # the last accumulated layer and its input
        self.handles = [lin.register_forward_hook(self._hook(name)) for name, lin in layers.items()]

    def _shared(self, name: str, x: torch.Tensor) -> bool:
        same = self._last is not None and self._last[1] is x
        if name not in self.shares and same and self.n_tokens[name] == 0:
            self.shares[name] = self._last[0]
        if name in self.shares:
            if not (same and self._last[0] == self.shares[name]):
                raise RuntimeError(f"{name} stopped sharing its input with {self.shares[name]}")
            return True
        self._last = (name, x)
        return False

    def _hook(self, name: str):
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            if self._shared(name, args[0]):
                return
            x = args[0].detach()
            X = x.reshape(-1, x.shape[-1])
            if self.mask is not None:
                X = X[self.mask]
            X = X.double()
            self.n_tokens[name] += X.shape[0]
            if "xtx" in self.needs:
                self.xtx[name] = self.xtx.get(name, 0) + X.T @ X
            if "absmean" in self.needs:
                self.abssum[name] = self.abssum.get(name, 0) + X.abs().sum(0)

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None

    def result(self) -> dict[str, LayerStats]:
        out = {}
        for name, n in self.n_tokens.items():
            if name in self.shares:
                src = out[self.shares[name]]
                out[name] = LayerStats(src.xtx, src.absmean, self.fisher[name].float().cpu() if name in self.fisher
                                       else None, src.n_tokens)
                continue
            out[name] = LayerStats(
                xtx=self.xtx[name].cpu() if name in self.xtx else None,
                absmean=(self.abssum[name] / max(n, 1)).cpu() if name in self.abssum else None,
                fisher=self.fisher[name].float().cpu() if name in self.fisher else None,
                n_tokens=n)
        return out


class _SampleFisher:
    """Σ_b G_b ⊙ G_b over samples b, with G_b = g_bᵀ x_b the gradient of sample b's loss w.r.t. a
    Linear weight: x_b (T x d) is the layer's input (forward hook), g_b (T x n) the gradient of its
    output (a hook on the output tensor) when the batch's summed per-sample losses are backpropagated.
    Exact (Σ_t g_bt x_btᵀ is that sample's weight gradient) and one backward pass per batch; padded
    positions carry g = 0 because no sample's loss reads them."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.fisher: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles = [lin.register_forward_hook(self._hook(name)) for name, lin in layers.items()]

    def _hook(self, name: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1:  # a second call's gradient would be squared apart from the first
                raise RuntimeError(f"{name} runs more than once per forward pass; its per-sample Fisher "
                                   "is not the sum of per-call squares (use calib.fisher=batch)")
            x = args[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                G = torch.bmm(g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2).to(x.dtype),
                              x.reshape(x.shape[0], -1, x.shape[-1]))  # (B, n, d)
                self.fisher[name] = self.fisher.get(name, 0) + G.double().square().sum(0)

            output.register_hook(on_grad)

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def grads_only(model: nn.Module, weights: list[torch.Tensor] | None) -> Iterator[None]:
    """Within: only ``weights`` require grad (None: leave the flags as they are); every flag restored after."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        if weights is not None:
            for p in model.parameters():
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def collect(model: nn.Module, layers: dict[str, nn.Module], batches: list[Batch],
            needs: tuple[str, ...], device: str, loss_fn: LossFn | None = None,
            fisher: str = "sample") -> dict[str, LayerStats]:
    """LayerStats of the Linears of ``layers`` over ``batches``: one forward (and, for fisher, one
    backward) per batch. ``loss_fn`` gives each sample's loss (B,); ``fisher`` is the estimator (FISHER)."""
    layers = linears(layers)
    acc = Accumulator(layers, needs)
    want_grad = "fisher" in needs
    if want_grad and loss_fn is None:
        raise ValueError("fisher statistics need a loss function")
    if want_grad and fisher not in FISHER:
        raise ValueError(f"calib.fisher={fisher!r} is unknown; valid: {', '.join(FISHER)}")
    per_sample = _SampleFisher(layers) if want_grad and fisher == "sample" else None
    try:
        with grads_only(model, [lin.weight for lin in layers.values()] if want_grad else None):
            for batch in batches:
                batch = to_device(batch, device)
                mask = batch.get("attention_mask")
                acc.mask = mask.reshape(-1).bool() if mask is not None else None
                if not want_grad:
                    with torch.no_grad():
                        model(**{k: v for k, v in batch.items() if k != "labels"})
                    continue
                if per_sample is not None:
                    per_sample.calls.clear()
                losses = loss_fn(model, batch)
                if per_sample is not None:
                    losses.sum().backward()
                else:
                    losses.mean().backward()
                    for name, lin in layers.items():
                        acc.fisher[name] = acc.fisher.get(name, 0) + lin.weight.grad.double() ** 2
                for lin in layers.values():
                    lin.weight.grad = None
    finally:
        acc.remove()
        if per_sample is not None:
            per_sample.remove()
    if per_sample is not None:
        acc.fisher = per_sample.fisher
    return acc.result()


# ---------------------------------------------------------------- cached statistics
def fisher_estimator(cfg: DictConfig) -> str:
    """calib.fisher (FISHER), ``sample`` where a calibration config does not set it."""
    return str(cfg.calib.get("fisher", "sample"))


def estimator_info(cfg: DictConfig, needs: tuple[str, ...]) -> dict[str, str]:
    """{"fisher": estimator} where the Fisher is collected: part of the cache key and the row's info."""
    return {"fisher": fisher_estimator(cfg)} if "fisher" in needs else {}


def stats_key(cfg: DictConfig, model_key: dict[str, Any], needs: tuple[str, ...]) -> dict[str, Any]:
    """Everything the statistics depend on (never the model id alone)."""
    c = cfg.calib
    source = SOURCES[cfg.model.kind]
    return {"version": CACHE_VERSION, "model": model_key, "kind": cfg.model.kind,
            "source": OmegaConf.to_container(c[source.config_key], resolve=True),
            "n_samples": int(c.n_samples), "seq_len": int(c.seq_len), "seed": int(c.seed),
            "batch_size": int(c.batch_size), "targets": str(cfg.model.targets), "stats": sorted(needs),
            **{k: c[k] for k, default in (("sampling", "stream"), ("bos", False))  # old cache keys stay valid
               if source.config_key == "text" and c.get(k, default) != default},
            **estimator_info(cfg, needs)}


def _flatten(stats: dict[str, LayerStats]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors named ``<layer>:<kind>``; a tensor shared by several layers is stored once (``alias``)."""
    tensors, alias, seen = {}, {}, {}
    for name, s in stats.items():
        for kind in ("xtx", "absmean", "fisher"):
            t = getattr(s, kind)
            if t is None:
                continue
            if id(t) in seen:
                alias[f"{name}:{kind}"] = seen[id(t)]
            else:
                seen[id(t)] = f"{name}:{kind}"
                tensors[f"{name}:{kind}"] = t
    return tensors, {"n_tokens": {name: s.n_tokens for name, s in stats.items()}, "alias": alias}


def _unflatten(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, LayerStats]:
    out = {name: LayerStats(n_tokens=n) for name, n in info["n_tokens"].items()}
    entries = {**tensors, **{key: tensors[src] for key, src in info.get("alias", {}).items()}}
    for key, t in entries.items():
        name, _, kind = key.rpartition(":")
        setattr(out[name], kind, t)
    return out


def calibration(model: nn.Module, ctx: Context, needs: tuple[str, ...]) -> tuple[list[Batch], LossFn | None]:
    """The batches of ``calib`` and, when the Fisher is needed, the loss behind it (on the dense ``model``)."""
    source = SOURCES[ctx.cfg.model.kind]
    batches = source.batches(ctx.cfg.calib, ctx.tokenizer)
    return batches, source.loss(model, batches, ctx.device) if "fisher" in needs else None


def layer_stats(model: nn.Module, layers: dict[str, nn.Module], ctx: Context,
                needs: tuple[str, ...]) -> tuple[dict[str, LayerStats], dict[str, Any]]:
    """(stats per layer, info for the row): read from the cache or computed once under its lock."""
    cfg = ctx.cfg
    t0 = time.perf_counter()

    def compute():
        batches, loss_fn = calibration(model, ctx, needs)
        return _flatten(collect(model, layers, batches, needs, ctx.device, loss_fn, fisher_estimator(cfg)))

    tensors, info, hit = cache.get_or_compute(ctx.cache_dir, "calib", stats_key(cfg, ctx.model_key, needs), compute)
    stats = _unflatten(tensors, info)
    return stats, {"cache_hit": hit, "seconds": round(time.perf_counter() - t0, 3), "stats": sorted(needs),
                   **estimator_info(cfg, needs),
                   "n_tokens": max((s.n_tokens for s in stats.values()), default=0)}


def check(cfg: DictConfig, needs: tuple[str, ...]) -> None:
    """ConfigError (before launch) for calibration settings that cannot work."""
    from lrsweep.errors import ConfigError

    if needs and cfg.model.kind not in SOURCES:
        raise ConfigError("model.kind", f"no calibration source for {cfg.model.kind!r}", sorted(SOURCES))
    if needs and cfg.model.kind == "causal_lm":
        sampling, bos = cfg.calib.get("sampling", "stream"), cfg.calib.get("bos", False)
        if sampling not in SAMPLERS:
            raise ConfigError("calib.sampling", f"{sampling!r} is unknown", sorted(SAMPLERS))
        if not isinstance(bos, bool):
            raise ConfigError("calib.bos", f"{bos!r} is not a boolean", [True, False])
        data.check_available(cfg.calib.text, "calib.text")
    if "fisher" in needs and fisher_estimator(cfg) not in FISHER:
        raise ConfigError("calib.fisher", f"{fisher_estimator(cfg)!r} is not an estimator of the Fisher", list(FISHER))
    if needs and cfg.get("stream", False) and "fisher" in needs:
        raise ConfigError("stream", "stream=true propagates activations block by block; the Fisher needs a "
                          "backward pass through the whole model", ["stream=false"])
