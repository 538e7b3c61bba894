"""The method registry: one file per method in this package, each registering itself here.

A built-in method is a function ``fn(W, o, *, rank, bits, seed, stats=None) -> Factorization`` whose
options ``o`` are an instance of its options dataclass (quantizing methods extend
:class:`QuantizerOptions`). ``@register(name, Options, ...)`` records both; the dataclass is the one
place of every default: it gives the method config (:func:`config_node`: ``name`` and the options;
a built-in is known by its name), which Hydra loads as ``method/base/<name>`` through lrsweep's config
source (hydra_plugins/lrsweep_methods) and conf/method/<name>.yaml extends, the valid option keys
(:meth:`MethodSpec.options`) and the types checked before launch (:meth:`MethodSpec.parse`).
The hooks (``storage_bits``, ``params``, ``max_rank``, ``rank_rule``, ``check``, ``metric``) take the
same ``o`` last; the spec calls every one of them with options as keywords (a config's dict), missing
ones at their defaults.

``metric(W, stats, o) -> Metric`` says which matrix the method truncates: M, whose rank-r truncated
SVD is the method's rank-r fit in its own error metric (dropping M's i-th singular value costs σ_i² of
that error), and how a matrix in M's space maps back to W's. A rank allocation ranks layers by M's
singular values; a method without the hook truncates W itself (its error is ‖W - Ŵ‖_F).

A method outside the package is a plain function ``fn(W, *, rank, bits, seed, stats=None, **options)``
named in config by ``method._target_=mypkg.mymethod`` and resolved with :func:`resolve` (it may carry
``needs``, ``storage_bits``, ``params`` and ``metric`` attributes, its hooks taking options as
keywords), or registered with ``@register(name)`` and no dataclass: its keyword-only arguments are its
options.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lrsweep.errors import ConfigError
from lrsweep.factorization import Factorization
from lrsweep.quant import GRIDS, OBSERVERS, QTensor, quantize, tensor_bits

# Calibration statistics a method may ask for (collected by lrsweep.calib):
#   "xtx": sum of x x^T over calibration tokens (d x d, fp64); "absmean": mean |x| per input channel;
#   "fisher": accumulated squared gradients of the weight (n x d).
STAT_KINDS = ("xtx", "absmean", "fisher")


@dataclass
class LayerStats:
    """Calibration statistics of one Linear layer's inputs (any of them may be absent)."""

    xtx: torch.Tensor | None = None
    absmean: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    n_tokens: int = 0
    # the same layer's statistics in the model whose earlier blocks are already compressed (the inputs its
    # compressed predecessors produce): given, besides the dense ones, to a method whose spec wants them
    shifted: LayerStats | None = None
    prepared: dict[str, Any] | None = None  # what the method's own ``prepare`` computed for this layer

    @classmethod
    def from_inputs(cls, X: torch.Tensor) -> LayerStats:
        """``xtx`` and ``absmean`` of layer inputs X (..., d), in fp64."""
        X = X.reshape(-1, X.shape[-1]).double()
        return cls(xtx=X.T @ X, absmean=X.abs().mean(0), n_tokens=X.shape[0])


def require(stats: LayerStats | None, kind: str, method: str) -> torch.Tensor:
    """The statistic ``kind`` of ``stats``, or a clear error naming what is missing."""
    value = getattr(stats, kind, None) if stats is not None else None
    if value is None:
        how = {"xtx": "inputs=X or stats=LayerStats(xtx=X.T @ X)",
               "absmean": "inputs=X or stats=LayerStats(absmean=...)",
               "fisher": "fisher=F or stats=LayerStats(fisher=F)"}[kind]
        raise ValueError(f"method {method} needs the calibration statistic {kind!r}, which is missing "
                         f"(pass {how}; in a sweep configure calib=...)")
    return value


@dataclass
class Metric:
    """The matrix a method truncates and the way back to the weight's space (the ``metric`` hook).

    ``matrix()`` makes M (n x k), whose rank-r truncated SVD is the method's rank-r fit: dropping its
    i-th singular value costs σ_i² of the method's error. ``back(A)`` maps a matrix in M's space (a
    truncation of M) to W's (n x d), with ``back(M) = W``. ``whitened``: M = W C with C C^T = X^T X,
    so that each right singular vector of M carries unit input energy (Σ_t (v_i^T C^-1 x_t)² = 1)."""

    matrix: Callable[[], torch.Tensor]
    back: Callable[[torch.Tensor], torch.Tensor]
    whitened: bool = False


@dataclass
class QuantizerOptions:
    """How a method's stored tensors are quantized at ``bits`` (:func:`lrsweep.quant.quantize`).

    ``grid`` and ``observer`` are checked as the options are made (a ConfigError before launch)."""

    scheme: str = "uniform"  # uniform (per-tensor min/max) | channel (scale per row) | group (scale per group)
    group_size: int = 128  # entries of a row per group (scheme: group)
    grid: str = "auto"  # channel / group scale rule: auto (full <= 3 bits, else tight) | full | tight | narrow
    observer: str = "absmax"  # absmax (the range) | mse (per group, the clipped range of least squared error)

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ConfigError("method.grid", f"{self.grid!r} is unknown", list(GRIDS))
        if self.observer not in OBSERVERS:
            raise ConfigError("method.observer", f"{self.observer!r} is unknown", list(OBSERVERS))

    def quantize(self, x: torch.Tensor, bits: int) -> QTensor:
        return quantize(x, bits, self.scheme, self.group_size, self.grid, self.observer)

    @property
    def rule(self) -> dict[str, str]:
        """The grid rule and observer as keywords of :func:`lrsweep.quant.quantize`."""
        return {"grid": self.grid, "observer": self.observer}

    def tensor_bits(self, shape: tuple[int, int], bits: int) -> int:
        return tensor_bits(shape, bits, self.scheme, self.group_size)


def lowrank_bits(n: int, d: int, rank: int, bits: int, o: QuantizerOptions | None = None) -> int:
    """Stored bits of L (n x r) and R (r x d) quantized at ``bits`` (by default as ``QuantizerOptions()``)."""
    o = o or QuantizerOptions()
    return o.tensor_bits((n, rank), bits) + o.tensor_bits((rank, d), bits)


def lowrank_params(n: int, d: int, rank: int, *_: Any, **__: Any) -> int:
    """Stored entries (parameters) of L (n x r) and R (r x d) (whatever the options)."""
    return rank * (n + d)


def _plain_lowrank_bits(n: int, d: int, rank: int, bits: int, scheme: str = "uniform", group_size: int = 128,
                        **_: Any) -> int:  # the grid rule and observer change no stored bits
    """:func:`lowrank_bits` of a method outside the package (options as keywords)."""
    return lowrank_bits(n, d, rank, bits, QuantizerOptions(scheme, group_size))


def _describe(hint: Any, plural: bool = False) -> str:
    """``hint`` in words: "an integer or null", "a list of integers", ..."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(h, plural) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0], plural=True)}"
    words = {bool: ("true/false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings"), type(None): ("null", "nulls")}
    return words[hint][plural] if hint in words else str(hint)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value has the type ``hint`` (an int is a float; a bool is neither)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list | tuple) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _typed(hook: Callable[..., Any] | None, options: type) -> Callable[..., Any] | None:
    """``hook(*args, o)`` called as ``hook(*args, **options)``: o built from the keywords (defaults for the rest)."""
    if hook is None:
        return None

    @functools.wraps(hook)
    def call(*args: Any, **opts: Any) -> Any:
        return hook(*args, options(**opts))

    return call


@dataclass(frozen=True)
class MethodSpec:
    """A method as the rest of lrsweep calls it: ``fn(W, rank=, bits=, seed=, stats=, **options)`` and
    hooks taking options as keywords (for a built-in, adapters over its typed function and hooks)."""

    name: str
    fn: Callable[..., Factorization]
    needs: tuple[str, ...] = ()  # calibration statistics (STAT_KINDS)
    storage_bits: Callable[..., int] | None = _plain_lowrank_bits  # (n, d, rank, bits, **opts) -> bits
    has_rank: bool = True  # False for methods without a rank (naive quantization)
    max_rank: Callable[..., int] | None = None  # (n, d, **opts) -> largest rank (default min(n, d))
    rank_rule: Callable[..., int | None] | None = None  # (n, d, bits, **opts) -> rank chosen by an option
    check: Callable[..., None] | None = None  # (n, d, **opts): raise ConfigError for bad options
    # (n, d, rank, **opts) -> stored parameters, used by param_ratio; None: param_ratio does not apply
    params: Callable[..., int] | None = lowrank_params
    option_type: type | None = None  # the options dataclass (None: a method outside the package)
    metric: Callable[..., Metric] | None = None  # (W, stats, **opts) -> the matrix it truncates; None: W
    # (**opts) -> whether the factors depend on `seed` (random projections, sketches): one seed is one sample
    randomized: Callable[..., bool] | None = None
    # (**opts) -> whether the method also takes ``LayerStats.shifted`` (the schedule then compresses block
    # by block, each block's shifted statistics from the model with the earlier blocks compressed)
    shifted: Callable[..., bool] | None = None
    # a method whose factorization spans layers (lrsweep.spanning): (name, **opts) -> how many layers of
    # that layer's type share one factor (1: the layer keeps its own), and the joint function
    # (weights by name, stats by name, opts, rank=, bits=, budget=, param_ratio=, seed=) -> factorizations by name
    spans: Callable[..., int] | None = None
    joint: Callable[..., dict[str, Factorization]] | None = None
    # (model, layers, calibration batches, loss_fn, param_ratio, **opts) -> (stats by layer, ranks by layer,
    # info): model-level work on the calibration data before the per-layer factorizations (dobi_svd's training)
    prepare: Callable[..., tuple[dict[str, LayerStats], dict[str, int], dict[str, Any]]] | None = None

    def wants_shifted(self, **opts: Any) -> bool:
        return bool(self.shifted and self.shifted(**opts))

    @property
    def target(self) -> str:
        """The import path of the method's function (the ``_target_`` of a config naming it)."""
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @property
    def builtin(self) -> bool:
        """Whether this is a typed method of this package (its config names it by ``name`` alone)."""
        return self.option_type is not None and self.fn.__module__.startswith(f"{__name__}.")

    @property
    def plain_params(self) -> bool:
        """Whether the stored parameters are plain factors' r (n + d)."""
        return self.params is not None and inspect.unwrap(self.params) is lowrank_params

    def is_randomized(self, **opts: Any) -> bool:
        """Whether this method's factors depend on ``seed`` with these options."""
        return bool(self.randomized and self.randomized(**opts))

    def rank_limit(self, n: int, d: int, **opts: Any) -> int:
        return self.max_rank(n, d, **opts) if self.max_rank else min(n, d)

    def defaults(self) -> dict[str, Any]:
        """Every option at its default ({} for a method outside the package)."""
        return dataclasses.asdict(self.option_type()) if self.option_type else {}

    def options(self) -> set[str] | None:
        """The option keys of the method (None: a function outside the package taking **kwargs)."""
        if self.option_type:
            return {f.name for f in dataclasses.fields(self.option_type)}
        params = inspect.signature(self.fn).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        return {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - set(CALL_ARGS)

    def parse(self, opts: Mapping[str, Any]) -> Any:
        """``opts`` as the method's options dataclass (a dict for a method outside the package), or a
        ConfigError naming the first unknown key (and the valid ones) or value of the wrong type."""
        accepted = self.options()
        if accepted is not None and set(opts) - accepted:
            bad = sorted(set(opts) - accepted)[0]
            raise ConfigError(f"method.{bad}", f"is not an option of method {self.name}",
                              sorted(accepted) or ["(none)"])
        if self.option_type is None:
            return dict(opts)
        hints = typing.get_type_hints(self.option_type)
        for key, value in opts.items():
            if not _fits(value, hints[key]):
                raise ConfigError(f"method.{key}", f"{value!r} is not {_describe(hints[key])}")
        return self.option_type(**opts)


def _typed_joint(joint: Callable[..., Any], options: type) -> Callable[..., Any]:
    """``joint(Ws, stats, o, **kw)`` called as ``joint(Ws, stats, opts_dict, **kw)``."""

    @functools.wraps(joint)
    def call(Ws: Any, stats: Any, opts: Mapping[str, Any], **kw: Any) -> Any:
        return joint(Ws, stats, options(**opts), **kw)

    return call


REGISTRY: dict[str, MethodSpec] = {}
CALL_ARGS = ("rank", "bits", "seed", "stats")  # keywords of every method that are not its options
BY_OPTIONS: dict[type, str] = {}  # options dataclass -> method name


def config_node(name: str) -> DictConfig:
    """The method config of the typed method ``name`` (KeyError: none registered): Hydra's
    ``method/base/<name>``, which conf/method/<name>.yaml extends (``defaults: [base/<name>@_here_]``;
    a subgroup, so that ``method=`` lists only the yamls).

    A built-in is known by ``name``; a method registered outside the package also carries its
    ``_target_``, which imports it where the config is read (a job on another node). The node is
    open (not struct), so ``method._target_=mypkg.fn`` swaps in another function under the
    method's name and options, as for ``method=custom``; an option the method does not take is
    still refused before launch, by :meth:`MethodSpec.parse` (exit 2, naming it and the valid ones)."""
    spec = REGISTRY[name]
    if spec.option_type is None:
        raise KeyError(name)
    node = OmegaConf.create({"name": spec.name, **({} if spec.builtin else {"_target_": spec.target}),
                             **spec.defaults()})
    OmegaConf.set_struct(node, False)
    return node


def _always(*_: Any, **__: Any) -> bool:
    return True


def _randomized_hook(flag: bool | Callable[..., bool]) -> Callable[..., bool] | None:
    """A ``randomized`` declaration as a hook of the options (None: never randomized)."""
    return flag if callable(flag) else _always if flag else None


def register(name: str, options: type | None = None, *, needs: tuple[str, ...] = (),
             storage_bits: Callable[..., int] | None = None, has_rank: bool = True,
             max_rank: Callable[..., int] | None = None, rank_rule: Callable[..., int | None] | None = None,
             check: Callable[..., None] | None = None, params: Callable[..., int] | None = lowrank_params,
             metric: Callable[..., Metric] | None = None, randomized: bool | Callable[..., bool] = False,
             shifted: Callable[..., bool] | None = None, spans: Callable[..., int] | None = None,
             joint: Callable[..., dict[str, Factorization]] | None = None,
             prepare: Callable[..., Any] | None = None):
    """Register ``fn`` as method ``name``: typed (``options``: its dataclass; fn and hooks take ``o``)
    or, without ``options``, a plain function taking its options as keywords (as outside the package).
    ``randomized``: whether the factors depend on ``seed`` (True, or a hook of the options, e.g. a
    randomized solver option); a sweep giving such a method one seed says so in its plan.

    A typed ``fn(W, o, *, rank, ...)`` is replaced by ``fn(W, o=None, *, rank, ..., **options)``: options
    given as keywords (the rest at their defaults) or as ``o``, with keywords replacing its fields."""

    def deco(fn: Callable[..., Factorization]) -> Callable[..., Factorization]:
        rand = _randomized_hook(randomized)
        if options is None:
            spec = MethodSpec(name, fn, tuple(needs), storage_bits or _plain_lowrank_bits, has_rank, max_rank,
                              rank_rule, check, params, metric=metric, randomized=rand)
        else:
            @functools.wraps(fn)
            def call(W: torch.Tensor, o: Any = None, /, **kw: Any) -> Factorization:
                args = {k: kw.pop(k) for k in CALL_ARGS if k in kw}
                return fn(W, options(**kw) if o is None else dataclasses.replace(o, **kw), **args)

            spec = MethodSpec(name, call, tuple(needs), _typed(storage_bits or lowrank_bits, options), has_rank,
                              _typed(max_rank, options), _typed(rank_rule, options), _typed(check, options),
                              _typed(params, options), options, _typed(metric, options),
                              _typed(rand, options) if callable(randomized) else rand,
                              _typed(shifted, options), _typed(spans, options),
                              None if joint is None else _typed_joint(joint, options), _typed(prepare, options))
            BY_OPTIONS[options] = name
        REGISTRY[name] = spec
        spec.fn.needs = tuple(needs)  # type: ignore[attr-defined]
        return spec.fn

    return deco


def spec_of(options: Any) -> MethodSpec:
    """The built-in method whose options dataclass ``options`` is an instance of."""
    name = BY_OPTIONS.get(type(options))
    if name is None:
        raise ConfigError("method", f"{type(options).__name__} is not the options dataclass of a registered method",
                          sorted(c.__name__ for c in BY_OPTIONS))
    return REGISTRY[name]


def resolve(name: str, target: str | None = None) -> MethodSpec:
    """The spec for a method config: the registered ``name``, or the callable at ``target``; a target
    that is a registered method's function (under any name, as a config carrying a built-in's
    ``_target_`` names it) is that registered method."""
    spec = REGISTRY.get(name)
    if target and (spec is None or target != spec.target):
        from hydra.utils import get_method

        fn = get_method(target)
        for spec in REGISTRY.values():
            if spec.fn is fn:
                return spec
        return MethodSpec(name, fn, tuple(getattr(fn, "needs", ())), getattr(fn, "storage_bits", _plain_lowrank_bits),
                          params=getattr(fn, "params", lowrank_params), metric=getattr(fn, "metric", None),
                          randomized=_randomized_hook(getattr(fn, "randomized", False)))
    if spec is None:
        raise KeyError(name)
    return spec


def rank_for_budget(spec: MethodSpec, n: int, d: int, bits: int, budget: float, **opts: Any) -> int:
    """The largest rank whose stored bits fit ``budget`` bits per weight (0 if none fits)."""
    limit = budget * n * d
    lo, hi = 0, spec.rank_limit(n, d, **opts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spec.storage_bits(n, d, mid, bits, **opts) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def rank_for_param_ratio(spec: MethodSpec, n: int, d: int, ratio: float, **opts: Any) -> int:
    """The largest rank whose stored parameters are at most ``ratio`` x the n x d dense ones (0 if none).

    For plain factors (r (n + d) parameters) this is SVD-LLM's ``int(n * d * ratio / (n + d))``,
    computed with that very expression so the ranks match theirs bit for bit; other structures
    (Kronecker terms, a sparse part) search their own parameter count.
    """
    if spec.plain_params:
        return min(int(n * d * ratio / (n + d)), spec.rank_limit(n, d, **opts))
    limit = ratio * n * d
    lo, hi = 0, spec.rank_limit(n, d, **opts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spec.params(n, d, mid, **opts) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
