"""The method registry: one file per method in this package, each registering itself here.

A method is a callable ``fn(W, *, rank, bits, seed, stats=None, **options) -> Factorization``.
Built-in methods register with :func:`register`; a method outside the package is named in
config by ``method._target_=mypkg.mymethod`` and resolved with :func:`resolve` (it may carry a
``needs`` attribute listing the calibration statistics it uses, like built-ins do).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lrsweep.factorization import Factorization
from lrsweep.quant import tensor_bits

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

    @classmethod
    def from_inputs(cls, X: torch.Tensor) -> LayerStats:
        X = X.reshape(-1, X.shape[-1]).double()
        return cls(xtx=X.T @ X, absmean=X.abs().mean(0), n_tokens=X.shape[0])


def require(stats: LayerStats | None, kind: str, method: str) -> torch.Tensor:
    """The statistic ``kind`` of ``stats``, or a clear error naming what is missing."""
    value = getattr(stats, kind, None) if stats is not None else None
    if value is None:
        how = {"xtx": "inputs=X or stats=LayerStats(xtx=X.T @ X)", "absmean": "inputs=X or stats=LayerStats(absmean=...)",
               "fisher": "fisher=F or stats=LayerStats(fisher=F)"}[kind]
        raise ValueError(f"method {method} needs the calibration statistic {kind!r}, which is missing "
                         f"(pass {how}; in a sweep configure calib=...)")
    return value


def lowrank_bits(n: int, d: int, rank: int, bits: int, scheme: str = "uniform", group_size: int = 128, **_: Any) -> int:
    """Stored bits of L (n x r) and R (r x d) quantized at ``bits``."""
    return tensor_bits((n, rank), bits, scheme, group_size) + tensor_bits((rank, d), bits, scheme, group_size)


def lowrank_params(n: int, d: int, rank: int, **_: Any) -> int:
    """Stored entries (parameters) of L (n x r) and R (r x d)."""
    return rank * (n + d)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Factorization]
    needs: tuple[str, ...] = ()  # calibration statistics (STAT_KINDS)
    storage_bits: Callable[..., int] | None = lowrank_bits  # (n, d, rank, bits, **opts) -> bits
    has_rank: bool = True  # False for methods without a rank (naive quantization)
    max_rank: Callable[..., int] | None = None  # (n, d, **opts) -> largest rank (default min(n, d))
    rank_rule: Callable[..., int | None] | None = None  # (n, d, bits, **opts) -> rank chosen by an option
    check: Callable[..., None] | None = None  # (n, d, **opts): raise ConfigError for bad options
    # (n, d, rank, **opts) -> stored parameters, used by param_ratio; None: param_ratio does not apply
    params: Callable[..., int] | None = lowrank_params

    def rank_limit(self, n: int, d: int, **opts: Any) -> int:
        return self.max_rank(n, d, **opts) if self.max_rank else min(n, d)

    def options(self) -> set[str] | None:
        """Keyword options the callable accepts (None: it takes **kwargs)."""
        params = inspect.signature(self.fn).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        return {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"rank", "bits", "seed", "stats"}


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, needs: tuple[str, ...] = (), storage_bits: Callable[..., int] | None = lowrank_bits,
             has_rank: bool = True, max_rank: Callable[..., int] | None = None,
             rank_rule: Callable[..., int | None] | None = None, check: Callable[..., None] | None = None,
             params: Callable[..., int] | None = lowrank_params):
    def deco(fn: Callable[..., Factorization]) -> Callable[..., Factorization]:
        REGISTRY[name] = MethodSpec(name, fn, tuple(needs), storage_bits, has_rank, max_rank, rank_rule, check,
                                    params)
        fn.needs = tuple(needs)  # type: ignore[attr-defined]
        return fn

    return deco


def resolve(name: str, target: str | None = None) -> MethodSpec:
    """The spec for a method config: the built-in ``name``, or the callable at ``target``."""
    if target:
        from hydra.utils import get_method

        fn = get_method(target)
        for spec in REGISTRY.values():
            if spec.fn is fn:
                return spec
        return MethodSpec(name, fn, tuple(getattr(fn, "needs", ())), getattr(fn, "storage_bits", lowrank_bits),
                          params=getattr(fn, "params", lowrank_params))
    if name not in REGISTRY:
        raise KeyError(name)
    return REGISTRY[name]


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
    if spec.params is lowrank_params:
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
