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
Inputs come from forward hooks, gradients from one backward pass per batch over the same forward.
A sample's loss is its own mean over its tokens (causal LM: mean next-token NLL of the window,
padding excluded; encoder: the probe cross-entropy of the text), as the reference codes compute it
with one sample per batch (ASVD4LLM's ``calib_fisher_info``).

The loss behind the Fisher depends on ``model.kind`` (``SOURCES``):
  causal_lm  the LM loss on ``calib.n_samples`` random windows of ``calib.seq_len`` tokens of
             ``calib.text`` (documents disjoint from the perplexity text by default), cut from the
             text tokenized once (``calib.sampling=stream``) or SVD-LLM's pieces at random character
             offsets tokenized one by one (``offsets``); ``calib.bos`` puts BOS first in each;
  encoder    cross-entropy of a logistic-regression head fitted on the dense model's embeddings
             of the labelled calibration texts (``calib.n_samples`` drawn with ``calib.seed`` from
             the train half of the probe split of ``calib.labelled``): a task loss that needs no
             MLM head and no labels we do not have.

Statistics are cached with :mod:`lrsweep.cache` keyed by the model key (path, weight-file
hash, dtype), the calibration source, sample count, sequence length, seed, batch size,
targets and the statistics collected: the first job of a sweep computes, the others read.
``calib.sequential=true`` compresses block by block (the name prefix up to the layer
index, e.g. ``model.layers.3``), taking each block's statistics from the model whose earlier
blocks are already compressed (as SVD-LLM / GPTQ do); those depend on the method, so they are
not cached.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import cache, data
from lrsweep.allocate import allocate
from lrsweep.allocate import scope as allocation_scope
from lrsweep.compress import LayerResult, compress_model, method_spec
from lrsweep.methods import LayerStats

CACHE_VERSION = 2  # 2: statistics shared by layers reading the same input are stored once
FISHER = ("sample", "batch")  # calib.fisher: the estimator of the Fisher (module docstring)


@dataclass
class Source:
    """Calibration batches and the loss for one model kind."""

    config_key: str  # which part of cfg.calib the batches come from
    batches: Callable[[DictConfig, Any], list[dict[str, torch.Tensor]]]
    # (model, cfg, batches, device) -> loss_fn; loss_fn(model, batch) -> each sample's loss (B,)
    loss: Callable[[nn.Module, DictConfig, list[dict[str, torch.Tensor]], str], Callable[[nn.Module, dict], torch.Tensor]]


# ---------------------------------------------------------------- causal LM: windows of text, LM loss
def _stream_windows(text: str, tokenizer: Any, c: DictConfig, bos: int | None) -> torch.Tensor:
    """``n_samples`` windows at random token offsets of the text tokenized once (torch generator, ``seed``)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=bos is None).input_ids[0]
    n = int(c.seq_len) - (bos is not None)  # the text tokens of a window (after BOS)
    if ids.numel() <= n:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than calib.seq_len={c.seq_len}")
    gen = torch.Generator().manual_seed(int(c.seed))
    starts = torch.randint(0, ids.numel() - n, (int(c.n_samples),), generator=gen)
    windows = torch.stack([ids[s:s + n] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], 1)
    return windows


def _offset_windows(text: str, tokenizer: Any, c: DictConfig, bos: int | None) -> torch.Tensor:
    """SVD-LLM's sampler (``get_calib_train_data``): python ``random`` seeded with ``seed`` draws a
    character offset i in [0, len(text) - seq_len - 1]; text[i : i + 10 seq_len] is tokenized on
    its own (with the tokenizer's special tokens: BOS for LLaMA's) and its first ``seq_len`` tokens
    are a sample. A piece with fewer tokens is drawn again (SVD-LLM drops it and returns fewer samples).
    """
    seq_len, rng, out = int(c.seq_len), random.Random(int(c.seed)), []
    if len(text) <= seq_len + 1:
        raise ValueError(f"calibration text has {len(text)} characters, too few for calib.seq_len={seq_len}")
    for _ in range(100 * int(c.n_samples)):
        i = rng.randint(0, len(text) - seq_len - 1)
        ids = tokenizer(text[i:i + 10 * seq_len], return_tensors="pt").input_ids[0]
        if bos is not None and (ids.numel() == 0 or int(ids[0]) != bos):
            ids = torch.cat([torch.tensor([bos], dtype=ids.dtype), ids])
        if ids.numel() >= seq_len:
            out.append(ids[:seq_len])
            if len(out) == int(c.n_samples):
                return torch.stack(out)
    raise ValueError(f"calibration text: {len(out)} of {c.n_samples} pieces reached calib.seq_len={seq_len} tokens")


SAMPLERS = {"stream": _stream_windows, "offsets": _offset_windows}  # calib.sampling


def _lm_batches(cfg: DictConfig, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    c = cfg.calib
    bos = data.bos_id(tokenizer, "calib.bos") if c.get("bos", False) else None
    windows = SAMPLERS[c.get("sampling", "stream")](data.load_text(c.text, "calib.text"), tokenizer, c, bos)
    return [{"input_ids": windows[i:i + c.batch_size]} for i in range(0, len(windows), c.batch_size)]


def _lm_loss(model, cfg, batches, device):
    """Each window's mean next-token NLL (padding excluded): their mean is the HF loss of a batch of
    equal-length windows."""

    def loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].to(nll.dtype) if mask is not None else torch.ones_like(nll)
        return (nll * keep).sum(1) / keep.sum(1).clamp(min=1)

    return loss


# ---------------------------------------------------------------- encoder: labelled texts, probe loss
def _encoder_batches(cfg: DictConfig, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    c = cfg.calib
    split = data.load_classification(c.labelled, 10**9, 0).train  # the half the probe never tests on
    pick = torch.randperm(len(split.texts), generator=torch.Generator().manual_seed(int(c.seed)))[:int(c.n_samples)]
    texts, labels = [split.texts[i] for i in pick.tolist()], [split.labels[i] for i in pick.tolist()]
    out = []
    for i in range(0, len(texts), c.batch_size):
        enc = tokenizer(texts[i:i + c.batch_size], padding=True, truncation=True, max_length=c.seq_len,
                        return_tensors="pt")
        out.append({**enc, "labels": torch.tensor(labels[i:i + c.batch_size])})
    return out


def _pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def _probe_loss(model, cfg, batches, device):
    """Cross-entropy of a logistic-regression head fitted on the dense embeddings of the batches."""
    from sklearn.linear_model import LogisticRegression

    with torch.no_grad():
        emb = torch.cat([_pooled(model, _to(b, device)).cpu() for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(emb.numpy(), labels.numpy())
    coef = torch.tensor(clf.coef_, dtype=torch.float32, device=device)
    intercept = torch.tensor(clf.intercept_, dtype=torch.float32, device=device)

    def loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # one value per text
        logits = _pooled(m, batch) @ coef.T + intercept
        if logits.shape[1] == 1:  # binary: sklearn keeps one logit
            return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], batch["labels"].float(),
                                                                  reduction="none")
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

    return loss


SOURCES: dict[str, Source] = {
    "causal_lm": Source("text", _lm_batches, _lm_loss),
    "encoder": Source("labelled", _encoder_batches, _probe_loss),
}


# ---------------------------------------------------------------- one pass with hooks
def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def linears(layers: dict[str, nn.Module]) -> dict[str, nn.Linear]:
    """The Linear modules of ``layers``: the only targets with input statistics (hooks go on these only)."""
    return {name: m for name, m in layers.items() if isinstance(m, nn.Linear)}


class _Accumulator:
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


def collect(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict[str, torch.Tensor]],
            needs: tuple[str, ...], device: str,
            loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
            fisher: str = "sample") -> dict[str, LayerStats]:
    """LayerStats of the Linears of ``layers`` over ``batches``: one forward (and, for fisher, one
    backward) per batch. ``loss_fn`` gives each sample's loss (B,); ``fisher`` is the estimator (FISHER)."""
    layers = linears(layers)
    acc = _Accumulator(layers, needs)
    want_grad = "fisher" in needs
    if want_grad and loss_fn is None:
        raise ValueError("fisher statistics need a loss function")
    if want_grad and fisher not in FISHER:
        raise ValueError(f"calib.fisher={fisher!r} is unknown; valid: {', '.join(FISHER)}")
    per_sample = _SampleFisher(layers) if want_grad and fisher == "sample" else None
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        if want_grad:
            for p in model.parameters():
                p.requires_grad_(False)
            for lin in layers.values():
                lin.weight.requires_grad_(True)
        for batch in batches:
            batch = _to(batch, device)
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
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    if per_sample is not None:
        acc.fisher = per_sample.fisher
    return acc.result()


# ---------------------------------------------------------------- cached statistics
def fisher_estimator(cfg: DictConfig) -> str:
    """calib.fisher (FISHER), ``sample`` where a calibration config does not set it."""
    return str(cfg.calib.get("fisher", "sample"))


def _estimator(cfg: DictConfig, needs: tuple[str, ...]) -> dict[str, str]:
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
            **_estimator(cfg, needs)}


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


def layer_stats(model: nn.Module, layers: dict[str, nn.Module], ctx: Any,
                needs: tuple[str, ...]) -> tuple[dict[str, LayerStats], dict[str, Any]]:
    """(stats per layer, info for the row): read from the cache or computed once under its lock."""
    cfg = ctx.cfg
    source = SOURCES[cfg.model.kind]
    t0 = time.perf_counter()

    def compute():
        batches = source.batches(cfg, ctx.tokenizer)
        loss_fn = source.loss(model, cfg, batches, ctx.device) if "fisher" in needs else None
        return _flatten(collect(model, layers, batches, needs, ctx.device, loss_fn, fisher_estimator(cfg)))

    tensors, info, hit = cache.get_or_compute(ctx.cache_dir, "calib", stats_key(cfg, ctx.model_key, needs), compute)
    stats = _unflatten(tensors, info)
    return stats, {"cache_hit": hit, "seconds": round(time.perf_counter() - t0, 3), "stats": sorted(needs),
                   **_estimator(cfg, needs),
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


# ---------------------------------------------------------------- compression with statistics
def blocks(layers: dict[str, nn.Module]) -> dict[str, dict[str, nn.Module]]:
    """Layers grouped by block: the name up to its first numeric component (``model.layers.3``); a
    layer without one (an embedding, ``lm_head``) is its own block."""
    out: dict[str, dict[str, nn.Module]] = {}
    for name, lin in layers.items():
        m = re.match(r"(.*?\.\d+)\.", name)
        out.setdefault(m.group(1) if m else name, {})[name] = lin
    return out


def compress(model: nn.Module, layers: dict[str, nn.Module], ctx: Any,
             progress: bool = True) -> tuple[list[LayerResult], dict[str, Any]]:
    """Compress ``layers`` with the statistics the method needs; (layer results, calibration info)."""
    cfg = ctx.cfg
    needs = method_spec(cfg.method).needs
    if cfg.get("stream", False):  # a global allocation here only for methods without statistics (validate)
        ranks, alloc = allocate(model, layers, ctx, None)
        results, info = streamed(model, layers, ctx, needs, ranks)
        return results, {**info, "allocation": alloc} if alloc else info
    if not needs:
        with allocation_scope(cfg):
            ranks, alloc = allocate(model, layers, ctx, None)
            results = compress_model(model, layers, cfg, progress=progress, ranks=ranks)
        return results, {"allocation": alloc} if alloc else {}
    if not cfg.calib.get("sequential", False):
        stats, info = layer_stats(model, layers, ctx, needs)
        with allocation_scope(cfg):
            ranks, alloc = allocate(model, layers, ctx, stats)
            results = compress_model(model, layers, cfg, stats=stats, progress=progress, ranks=ranks)
        return results, {**info, "allocation": alloc} if alloc else info
    source = SOURCES[cfg.model.kind]
    t0 = time.perf_counter()
    batches = source.batches(cfg, ctx.tokenizer)
    loss_fn = source.loss(model, cfg, batches, ctx.device) if "fisher" in needs else None
    results, calib_seconds = [], 0.0
    for block in blocks(layers).values():
        t1 = time.perf_counter()
        stats = collect(model, block, batches, needs, ctx.device, loss_fn, fisher_estimator(cfg))
        calib_seconds += time.perf_counter() - t1
        results += compress_model(model, block, cfg, stats=stats, progress=False)
    return results, {"cache_hit": False, "sequential": True, "stats": sorted(needs),
                     **_estimator(cfg, needs),
                     "seconds": round(calib_seconds, 3), "total_seconds": round(time.perf_counter() - t0, 3)}


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

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no KV cache shared across batches
    try:
        for batch in batches:
            try:
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})
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


@torch.no_grad()
def streamed(model: nn.Module, layers: dict[str, nn.Module], ctx: Any, needs: tuple[str, ...],
             ranks: dict[str, int] | None = None) -> tuple[list[LayerResult], dict[str, Any]]:
    """Compress block by block with only the current block on ``ctx.device`` (the model stays on CPU).

    Statistics (xtx, absmean) come from the block's inputs, propagated from block to block on the
    device (GPTQ-style): through the dense block, or the compressed one with ``calib.sequential``.
    Returns the layer results and, per block, seconds and peak device memory.
    """
    cfg, device = ctx.cfg, ctx.device
    groups = blocks(layers)
    if "fisher" in needs:
        raise ValueError("stream=true propagates activations block by block; fisher needs a backward pass "
                         "through the whole model (use stream=false)")
    inputs, masks = [], []
    if needs:
        batches = SOURCES[cfg.model.kind].batches(cfg, ctx.tokenizer)
        first = model.get_submodule(next(iter(groups)))
        inputs = [_move(x, device) for x in _first_block_inputs(model, first, batches)]
        masks = [b.get("attention_mask") for b in batches]
    sequential = bool(cfg.calib.get("sequential", False)) if needs else False
    cuda = device.startswith("cuda")
    results, per_block = [], {}
    for name, block_layers in groups.items():
        block = model.get_submodule(name)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        block.to(device)
        stats, outputs = None, []
        if needs:
            acc = _Accumulator(block_layers, needs)
            try:
                for (args, kwargs), mask in zip(inputs, masks):
                    acc.mask = mask.reshape(-1).bool().to(device) if mask is not None else None
                    outputs.append(_run_block(block, args, kwargs))
            finally:
                acc.remove()
            stats = acc.result()
        results += compress_model(model, block_layers, cfg, stats=stats, progress=False, ranks=ranks)
        if sequential:  # the next block sees this block compressed
            outputs = [_run_block(block, args, kwargs) for args, kwargs in inputs]
        inputs = [_with_hidden(args, kwargs, out) for (args, kwargs), out in zip(inputs, outputs)]
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
