"""FWSVD (Hsu et al., ICLR 2022): Fisher-weighted SVD.

Row weights w_i = sqrt(sum_j F_ij) from the accumulated squared gradients F (n x d);
SVD of diag(w) W, then L = diag(w)^-1 U_r S_r^1/2, R = S_r^1/2 V_r^T. This minimizes the
row-weighted error ||diag(w) (W - L R)||_F. Zero rows get a small floor weight (eps * max w).
"""

from __future__ import annotations

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import register, require
from lrsweep.methods.svd import balanced, truncated_svd
from lrsweep.quant import quantize


def row_weights(fisher: torch.Tensor, eps: float) -> torch.Tensor:
    w = fisher.double().sum(dim=1).clamp_min(0).sqrt()
    if not torch.isfinite(w).all() or w.max() <= 0:
        raise ValueError("fwsvd: the Fisher statistic is all zero or not finite")
    return w.clamp_min(eps * w.max())


@register("fwsvd", needs=("fisher",))
def fwsvd(W: torch.Tensor, *, rank: int, bits: int = 16, seed: int = 0, stats=None, eps: float = 1e-6,
          scheme: str = "uniform", group_size: int = 128, driver: str = "auto") -> LowRank:
    fisher = require(stats, "fisher", "fwsvd").to(W.device)
    w = row_weights(fisher, eps)
    U, S, Vh, solver = truncated_svd(W.float() * w[:, None].float(), rank, driver)
    L, R = balanced(U / w[:, None].float(), S, Vh)
    return LowRank.of(quantize(L, bits, scheme, group_size), quantize(R, bits, scheme, group_size), solver=solver)
