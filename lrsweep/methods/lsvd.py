"""LSVD (the LPLR paper's SVD variant): L = Q(U_r), then R = Q'(argmin_Z ||L Z - W||_F).

The left factor is DSVD's; the right factor is refit to the *quantized* left factor, which
absorbs part of L's quantization error (so LSVD is never worse than DSVD before R is quantized).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, register
from lrsweep.methods.dsvd import quantized_left
from lrsweep.methods.lplr import least_squares
from lrsweep.methods.svd import SVDOptions


@dataclass
class LSVDOptions(SVDOptions):
    pass


@register("lsvd", LSVDOptions)
def lsvd(W: torch.Tensor, o: LSVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
         stats: LayerStats | None = None) -> LowRank:
    L, _, _, solver = quantized_left(W, o, rank, bits)
    return LowRank.of(L, o.quantize(least_squares(L.value, W.float()), bits), solver=solver)
