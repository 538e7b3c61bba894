"""Compression of one matrix (``compress_matrix``) and of a model's layers in place (``compress_``).

Both take the method as one of the options dataclasses of :mod:`lrsweep.methods` (``SVDOptions(...)``)
or as a name with keyword options (``"svd", driver="gesvd"``), need no Hydra config, and keep W's
dtype. The config-driven path (``compress_model``, called by a job) is an adapter over ``compress_``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import methods
from lrsweep.errors import ConfigError
from lrsweep.factorization import Factorization
from lrsweep.methods import LayerStats, MethodSpec
from lrsweep.methods import svd as _svd

# keys of a method config that are not keyword options of the method (_target_: custom methods only)
METHOD_META_KEYS = ("name", "_target_", "needs")


def method_spec(mcfg: DictConfig | dict) -> MethodSpec:
    """The method of a config: the registered ``name`` (a built-in's config has no ``_target_``), or
    the callable at ``_target_`` (a method outside the package, or another function under a built-in's
    name and options)."""
    if OmegaConf.is_config(mcfg) and OmegaConf.is_missing(mcfg, "_target_"):
        raise ConfigError("method._target_", f"method={mcfg.get('name')} needs the callable of your method",
                          ["method._target_=mypkg.mymodule.myfn"])
    name, target = mcfg.get("name"), mcfg.get("_target_")
    try:
        return methods.resolve(str(name), target)
    except KeyError:
        raise ConfigError("method", f"{name!r} is unknown", sorted(methods.REGISTRY)) from None
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError("method._target_", f"cannot import {target!r}: {e}") from None


def method_options(mcfg: DictConfig | dict) -> dict[str, Any]:
    opts = OmegaConf.to_container(mcfg, resolve=True) if OmegaConf.is_config(mcfg) else dict(mcfg)
    return {k: v for k, v in opts.items() if k not in METHOD_META_KEYS}


def method_of(method: Any, target: str | None = None, **options: Any) -> tuple[MethodSpec, dict[str, Any]]:
    """(spec, options) of a method given as an options dataclass instance (``options`` replace its
    fields), a method config (``cfg.method``), or a name (``target``: a callable outside the package)
    with keyword options. Unknown options and values of the wrong type are a ConfigError."""
    if dataclasses.is_dataclass(method) and not isinstance(method, type):
        spec, options = methods.spec_of(method), {**dataclasses.asdict(method), **options}
    elif isinstance(method, Mapping) or OmegaConf.is_config(method):
        spec, options = method_spec(method), {**method_options(method), **options}
    else:
        spec = method_spec({"name": method, "_target_": target})
    spec.parse(options)
    return spec, options


def resolve_rank(spec: MethodSpec, n: int, d: int, rank: int | None, bits: int, budget: float | None,
                 opts: dict[str, Any], param_ratio: float | None = None) -> int:
    """The rank of an (n x d) layer: ``rank``, the largest rank that fits ``budget`` bits/weight,
    or the largest that keeps at most ``param_ratio`` of its parameters (SVD-LLM's rule)."""
    if spec.check:
        spec.check(n, d, **opts)
    if not spec.has_rank:
        return min(n, d)
    limit = spec.rank_limit(n, d, **opts)
    if spec.rank_rule and (r := spec.rank_rule(n, d, bits, **opts)) is not None:
        if not 1 <= r <= limit:
            raise ConfigError("method", f"{spec.name}'s rank rule gives rank {r} for a {n}x{d} layer "
                              f"(valid: 1..{limit})")
        return r
    if param_ratio is not None:
        if spec.params is None:
            raise ConfigError("param_ratio", f"does not apply to method {spec.name} (it stores every weight); "
                              "use budget (bits per weight) instead", ["null"])
        r = methods.rank_for_param_ratio(spec, n, d, param_ratio, **opts)
        if r < 1:
            raise ConfigError("param_ratio", f"{param_ratio} leaves a {n}x{d} layer at rank 0 with method "
                              f"{spec.name} (rank 1 keeps {spec.params(n, d, 1, **opts) / (n * d):.4f})")
        return r
    if budget is not None:
        r = methods.rank_for_budget(spec, n, d, bits, budget, **opts)
        if r < 1:
            fixed = spec.storage_bits(n, d, 0, bits, **opts) / (n * d)  # what every rank stores (Q of W ~ Q + L R)
            why = f"below the {fixed:.3f} bits/weight of its rank-0 part (Q at {bits} bits)" if fixed > budget \
                else f"rank 1 needs {spec.storage_bits(n, d, 1, bits, **opts) / (n * d):.3f}"
            raise ConfigError("budget", f"{budget} bits/weight is infeasible for a {n}x{d} layer with "
                              f"method {spec.name} at {bits} bits ({why})")
        return r
    if rank is None or int(rank) < 1:
        raise ConfigError("rank", f"{rank!r} must be a positive integer")
    if int(rank) > limit:
        raise ConfigError("rank", f"{rank} exceeds the largest rank {limit} of method {spec.name} "
                          f"for a {n}x{d} layer")
    return int(rank)


def factorize(spec: MethodSpec, W: torch.Tensor, opts: dict[str, Any], rank: int, bits: int, seed: int,
              stats: LayerStats | None, share: bool = False) -> Factorization:
    """The method's factorization of W at ``rank``, reconstructing (and building modules) in W's dtype.
    Inside :func:`lrsweep.methods.svd.reuse`, ``share=True`` keeps the result (a rank allocation's
    check) and a later call with the same inputs takes it (the compression at the ranks it ships)."""

    def compute():
        return stats, spec.fn(W, rank=rank, bits=bits, seed=seed, stats=stats, **opts)  # stats kept: id unique

    _, f = _svd.memo("factorizations", lambda: factorization_key(spec, W, opts, rank, bits, seed, stats), compute,
                     take=not share)
    f.dtype = W.dtype
    return f


def factorization_key(spec: MethodSpec, W: torch.Tensor, opts: dict[str, Any], rank: int, bits: int, seed: int,
                      stats: LayerStats | None) -> tuple:
    """What a method's result depends on: W's bytes, the method, its options, rank, bits, seed and the
    statistics (by identity: a run's statistics do not change while kept)."""
    return _svd.content_key(W), rank, spec.name, repr(sorted(opts.items())), bits, seed, id(stats)


def compress_matrix(W: torch.Tensor, method: Any = "svd", rank: int | None = None, bits: int = 16,
                    budget: float | None = None, param_ratio: float | None = None, seed: int = 0,
                    inputs: torch.Tensor | None = None,
                    fisher: torch.Tensor | None = None, stats: LayerStats | None = None,
                    target: str | None = None, **options: Any) -> Factorization:
    """Compress one weight matrix W (n x d) with ``method``, keeping W's dtype.

    Args:
        W: the weight, n x d (out x in, as ``nn.Linear`` stores it).
        method: a registered name (``"svd"``, ``"lplr"``, ...) with its options as keyword
            ``options``, or an options dataclass (``SVDOptions(driver="gesvd")``; keyword options
            replace its fields). The methods and their options: docs/guide/methods.md.
        rank: the rank; or give ``budget`` (bits per weight) or ``param_ratio`` (fraction of the
            parameters kept) and the largest rank that fits is taken.
        bits: bits of each stored entry: 2..15 integer codes, 16 = fp16, 32 = fp32.
        budget: target bits per weight, quantizer metadata included.
        param_ratio: fraction of W's parameters kept (SVD-LLM's rule for two factors).
        seed: seed of the method's random draws.
        inputs: layer inputs X (N x d), for the data-aware methods (their ``xtx`` and ``absmean``).
        fisher: accumulated squared gradients of W (n x d), for ``fwsvd``.
        stats: precomputed calibration statistics instead of ``inputs`` / ``fisher``.
        target: the import path of a method outside the package, run under the name ``method``.
        **options: the method's options.

    Returns:
        The factorization: ``reconstruct()``, ``storage_bits``, ``rank``, ``as_module(bias)``.

    Raises:
        lrsweep.errors.ConfigError: an unknown method or option, a value of the wrong type, or a
            rank, budget or ratio that does not fit W.
        ValueError: a data-aware method without the statistic it needs.
    """
    spec, options = method_of(method, target, **options)
    if stats is None and (inputs is not None or fisher is not None):
        stats = LayerStats.from_inputs(inputs) if inputs is not None else LayerStats()
        stats.fisher = fisher
    elif fisher is not None:
        stats = dataclasses.replace(stats, fisher=fisher)
    for kind in spec.needs:
        methods.require(stats, kind, spec.name)
    n, d = W.shape
    r = resolve_rank(spec, n, d, rank, bits, budget, options, param_ratio)
    return factorize(spec, W, options, r, bits, seed, stats)


@dataclass
class LayerResult:
    """What :func:`compress_` did to one weight.

    Attributes:
        name: the module's qualified name (of the first module of a tied group).
        shape: (n, d) of the weight.
        rank: the rank used.
        storage_bits: bits the factorization stores, quantizer metadata included.
        dense_bits: bits of the dense weight in its dtype.
        rel_err: ||W - W_hat||_F / ||W||_F.
        seconds: time of this layer's compression.
        factorization: the factorization itself (with ``keep=True``), else None.
        info: the method's details (solver, shift, ...; ``tied``: the other modules of its
            tied group).
        params: stored weight entries (``Factorization.params``).
        exceeds_break_even: whether the factorization stores at least as many bits as W.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    storage_bits: int
    dense_bits: int
    rel_err: float
    seconds: float
    factorization: Factorization | None = field(default=None, repr=False)  # kept for save_compressed / heal
    info: dict[str, Any] = field(default_factory=dict)  # the method's details (solver, shift, ...)
    params: int | None = None  # stored weight entries (Factorization.params)

    @property
    def exceeds_break_even(self) -> bool:
        return self.storage_bits >= self.dense_bits


def target_layers(model: nn.Module,
                  targets: str | Iterable[str] | Mapping[str, nn.Module] | None) -> dict[str, nn.Module]:
    """The modules ``targets`` names: every nn.Linear (None), those whose qualified name fully matches a
    regex (str, as ``model.targets``), the named ones (names), or ``targets`` itself (name -> module)."""
    if isinstance(targets, Mapping):
        return dict(targets)
    if targets is None:
        return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if isinstance(targets, str):
        from lrsweep.models import target_modules

        layers = target_modules(model, targets)
        if not layers:
            raise ValueError(f"targets {targets!r} match no Linear or Embedding module of the model")
        return layers
    return {name: model.get_submodule(name) for name in targets}


def layer_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th target layer (model order) of a run seeded ``seed``."""
    return int(seed) * 100_003 + int(index)


def compress_(model: nn.Module, method: Any, targets: str | Iterable[str] | Mapping[str, nn.Module] | None = None, *,
              rank: int | None = None, bits: int = 16, budget: float | None = None, param_ratio: float | None = None,
              seed: int = 0, stats: Mapping[str, LayerStats] | None = None, ranks: Mapping[str, int] | None = None,
              keep: bool = False, progress: bool = False, target: str | None = None,
              offload: str | None = None, **options: Any) -> list[LayerResult]:
    """Replace the ``targets`` of ``model`` (Linear or Embedding modules; default every nn.Linear) by their
    compressed modules, in place and in model order, and return one :class:`LayerResult` per weight.

    ``method``: an options dataclass (``SVDOptions(scheme="group")``) or a name with keyword ``options``
    (``"svd", scheme="group"``); ``target``: the import path of a method outside the package. Each
    layer's rank is ``ranks[name]``, else ``rank``, the largest that fits ``budget`` bits per weight,
    or the largest keeping ``param_ratio`` of its parameters. ``stats``: calibration statistics by
    layer name, for the methods that need them. Layer i is compressed with seed ``seed * 100003 + i``.
    ``keep``: keep each layer's factorization in its result (``save_compressed``, healing).
    ``offload``: a device (``"cpu"``) each replaced module moves to once its replacement is in the model,
    so that a model compressed on a GPU never holds its dense and compressed layers there together.

    Modules holding the same weight (tied embeddings, see :mod:`lrsweep.tying`) are compressed once,
    by the first of them in ``targets``, and all replaced by modules sharing the new parameters: one
    result, whose ``info["tied"]`` names the others.

    Args:
        model: the model, changed in place.
        method: an options dataclass or a registered name (see :func:`compress_matrix`).
        targets: a regex over qualified module names (full match, as ``model.targets``), a list of
            names, or name -> module; None: every ``nn.Linear``.
        rank: the rank of every layer (or ``budget`` / ``param_ratio`` / ``ranks``).
        bits: bits of each stored entry: 2..15 integer codes, 16 = fp16, 32 = fp32.
        budget: target bits per weight of every layer.
        param_ratio: fraction of every layer's parameters kept.
        seed: the run's seed (layer i gets ``seed * 100003 + i``).
        stats: calibration statistics (``LayerStats``) by layer name.
        ranks: each layer's rank by name (from a rank allocation).
        keep: keep each layer's factorization in its result.
        progress: show a progress bar.
        target: the import path of a method outside the package.
        offload: where each replaced module goes once its replacement is in (``"cpu"``).
        **options: the method's options.

    Returns:
        One result per compressed weight, in model order.
    """
    from tqdm.auto import tqdm

    from lrsweep import spanning, tying

    spec, opts = method_of(method, target, **options)
    layers = target_layers(model, targets)
    results = []
    order = {name: i for i, name in enumerate(layers)}  # seeds follow the target order
    joint = spanning.factorize_groups(spec, opts, layers, stats, rank=rank, bits=bits, budget=budget,
                                      param_ratio=param_ratio, seed=seed)  # factors spanning layers
    for name, tied in tqdm(tying.groups(model, layers).items(), desc=spec.name, disable=not progress):
        W = layers[name].weight.detach()
        n, d = W.shape
        t0 = time.perf_counter()
        if name in joint:
            f, seconds = joint[name]
        else:
            r = ranks[name] if ranks else resolve_rank(spec, n, d, rank, bits, budget, opts, param_ratio)
            f = factorize(spec, W, opts, r, bits, layer_seed(seed, order[name]), (stats or {}).get(name))
            seconds = time.perf_counter() - t0
        replaced = [model.get_submodule(n) for n in (name, *tied)]
        tying.install(model, [name, *tied], f, dtype=W.dtype)
        if offload is not None:
            for m in replaced:
                m.to(offload)
        dense_bits = n * d * torch.finfo(W.dtype).bits
        info = {**f.info, "tied": tied} if tied else f.info
        results.append(LayerResult(name, (n, d), f.rank, f.storage_bits, dense_bits, f.rel_error(W), seconds,
                                   f if keep else None, info, f.params))
    return results


def compress_model(model: nn.Module, layers: dict[str, nn.Module], cfg: DictConfig,
                   stats: dict[str, LayerStats] | None = None, progress: bool = True,
                   ranks: dict[str, int] | None = None, offload: str | None = None) -> list[LayerResult]:
    """:func:`compress_` with the method, rank, bits, budget, param_ratio and seed of a run's config;
    ``ranks`` (from :mod:`lrsweep.allocate`) fixes each layer's rank."""
    return compress_(model, cfg.method, layers, rank=cfg.rank, bits=cfg.bits, budget=cfg.budget,
                     param_ratio=cfg.get("param_ratio"), seed=cfg.seed, stats=stats, ranks=ranks,
                     keep=bool(cfg.get("save_compressed") or cfg.get("heal")), progress=progress,
                     offload=offload)
