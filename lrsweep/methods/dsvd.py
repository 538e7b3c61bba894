"""DSVD (direct SVD quantization, the LPLR paper's baseline): L = Q(U_r), R = Q(S_r V_r^T), no refit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, register
from lrsweep.methods.svd import SVDOptions, truncated_svd


@dataclass
class DSVDOptions(SVDOptions):
    pass


@register("dsvd", DSVDOptions)
def dsvd(W: torch.Tensor, o: DSVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
         stats: LayerStats | None = None) -> LowRank:
    U, S, Vh, solver = truncated_svd(W, rank, o.driver)
    L = o.quantize(U.float(), bits)
    R = o.quantize((S[:, None] * Vh).float(), bits)
    return LowRank.of(L, R, solver=solver)
