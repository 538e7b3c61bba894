"""ASVD (Yuan et al., 2023): activation-aware SVD.

Column scales s_j = (mean |x_j|)^alpha (alpha 0.5); SVD of W diag(s), then R <- R diag(s)^-1
(the inverse scale goes on the input side, V's rows, as in the reference), L = U_r S_r^½,
R = S_r^½ V_rᵀ diag(s)⁻¹ (the reference's ``sigma_fuse=UV``). Channels that never fire get a
floor scale (eps × max s).

``solver``: ``exact`` (default) is the truncated SVD; ``lowrank`` is the reference's randomized
``torch.svd_lowrank(W diag(s), q=rank, niter=2)`` (hahnyuan/ASVD4LLM), seeded with ``seed``, to
reproduce its numbers. Other differences from the reference, none of which changes the factors
beyond rounding: it sums each sample's mean |x| over the samples (we take the mean over all
tokens: the same up to a constant factor for equal-length windows, and a constant factor of s
cancels) and adds 1e-6 to s instead of the relative floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, Metric, register, require
from lrsweep.methods.svd import SVDOptions, balanced, content_key, from_statistic, truncated_svd

SOLVERS = ("exact", "lowrank")
NITER = 2  # torch.svd_lowrank's default, what the reference runs


def lowrank_svd(A: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U_r, S_r, Vh_r, solver) of torch.svd_lowrank(A, q=rank, niter=2), its random draws seeded by ``seed``."""
    with torch.random.fork_rng(devices=[A.device] if A.is_cuda else []):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(A, q=rank, niter=NITER)
    return U, S, V.T, f"torch.svd_lowrank[niter={NITER}]"


@dataclass
class ASVDOptions(SVDOptions):
    alpha: float = 0.5  # exponent of the activation scale
    eps: float = 1e-6  # floor of the scales, relative to the largest
    solver: str = "exact"  # exact SVD | lowrank: torch.svd_lowrank(q=rank, niter=2) as in ASVD4LLM, seeded by `seed`


def check(n: int, d: int, o: ASVDOptions) -> None:
    if o.solver not in SOLVERS:
        raise ConfigError("method.solver", f"{o.solver!r} is not an asvd solver", list(SOLVERS))


def scale(absmean: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """ASVD's per-channel scales: absmean^alpha, floored at eps x the largest (fp32)."""
    s = absmean.double().clamp_min(0) ** alpha
    if not torch.isfinite(s).all() or s.max() <= 0:
        raise ValueError("asvd: the absmean statistic is all zero or not finite")
    return s.clamp_min(eps * s.max()).float()


def layer_scales(W: torch.Tensor, stats: LayerStats | None, o: ASVDOptions) -> tuple[tuple, torch.Tensor]:
    """(key, s): :func:`scale` of the layer's absmean on W's device, derived once per statistic in a
    :func:`~lrsweep.methods.svd.reuse` scope."""
    absmean = require(stats, "absmean", "asvd")
    return from_statistic("asvd scales", absmean, lambda: scale(absmean.to(W.device), o.alpha, o.eps),
                          str(W.device), o.alpha, o.eps)


def metric(W: torch.Tensor, stats: LayerStats | None, o: ASVDOptions) -> Metric:
    """M = W diag(s), whose truncation error is ‖(W - Ŵ) diag(s)‖_F (Ŵ = M_r diag(s)^-1)."""
    _, s = layer_scales(W, stats, o)
    return Metric(lambda: W.float() * s, lambda A: A / s)


@register("asvd", ASVDOptions, needs=("absmean",), check=check, metric=metric,
          randomized=lambda o: o.solver == "lowrank")
def asvd(W: torch.Tensor, o: ASVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
         stats: LayerStats | None = None) -> LowRank:
    check(*W.shape, o)
    scales, s = layer_scales(W, stats, o)
    if o.solver == "lowrank":
        U, S, Vh, used = lowrank_svd(W.float() * s, rank, seed)
    else:  # keyed by W and the scales, not hashed
        U, S, Vh, used = truncated_svd(lambda: W.float() * s, rank, o.driver,
                                       key=lambda: (content_key(W), scales))
    L, R = balanced(U, S, Vh / s)
    return LowRank.of(o.quantize(L, bits), o.quantize(R, bits), solver=used, alpha=o.alpha)
