"""DSVD (direct SVD quantization, the LPLR paper's baseline): L = Q(U_r), R = Q(S_r V_r^T), no refit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, register
from lrsweep.methods.svd import SVDOptions, truncated_svd
from lrsweep.quant import QTensor


@dataclass
class DSVDOptions(SVDOptions):
    pass


def quantized_left(W: torch.Tensor, o: SVDOptions, rank: int, bits: int
                   ) -> tuple[QTensor, torch.Tensor, torch.Tensor, str]:
    """(L = Q(U_r), S_r, V_r^T, solver): DSVD's left factor, and the rest of the truncated SVD."""
    U, S, Vh, solver = truncated_svd(W, rank, o.driver)
    return o.quantize(U.float(), bits), S, Vh, solver


@register("dsvd", DSVDOptions)
def dsvd(W: torch.Tensor, o: DSVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
         stats: LayerStats | None = None) -> LowRank:
    L, S, Vh, solver = quantized_left(W, o, rank, bits)
    return LowRank.of(L, o.quantize((S[:, None] * Vh).float(), bits), solver=solver)
