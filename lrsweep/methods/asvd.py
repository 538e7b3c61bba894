"""ASVD (Yuan et al., 2023): activation-aware SVD.

Column scales s_j = (mean |x_j|)^alpha; SVD of W diag(s), then R <- R diag(s)^-1.
Channels that never fire get a small floor scale (eps * max s).
"""

from __future__ import annotations

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import register, require
from lrsweep.methods.svd import balanced, truncated_svd
from lrsweep.quant import quantize


@register("asvd", needs=("absmean",))
def asvd(W: torch.Tensor, *, rank: int, bits: int = 16, seed: int = 0, stats=None, alpha: float = 0.5,
         eps: float = 1e-6, scheme: str = "uniform", group_size: int = 128, driver: str = "auto") -> LowRank:
    absmean = require(stats, "absmean", "asvd").to(W.device).double()
    s = absmean.clamp_min(0) ** alpha
    if not torch.isfinite(s).all() or s.max() <= 0:
        raise ValueError("asvd: the absmean statistic is all zero or not finite")
    s = s.clamp_min(eps * s.max())
    U, S, Vh, solver = truncated_svd(W.float() * s.float(), rank, driver)
    L, R = balanced(U, S, Vh / s.float())
    return LowRank.of(quantize(L, bits, scheme, group_size), quantize(R, bits, scheme, group_size),
                      solver=solver, alpha=alpha)
