"""DSVD (direct SVD quantization, the LPLR paper's baseline): L = Q(U_r), R = Q(S_r V_r^T), no refit."""

from __future__ import annotations

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import register
from lrsweep.methods.svd import truncated_svd
from lrsweep.quant import quantize


@register("dsvd")
def dsvd(W: torch.Tensor, *, rank: int, bits: int = 16, seed: int = 0, stats=None,
         scheme: str = "uniform", group_size: int = 128, driver: str = "auto") -> LowRank:
    U, S, Vh, solver = truncated_svd(W, rank, driver)
    L = quantize(U.float(), bits, scheme, group_size)
    R = quantize((S[:, None] * Vh).float(), bits, scheme, group_size)
    return LowRank.of(L, R, solver=solver)
