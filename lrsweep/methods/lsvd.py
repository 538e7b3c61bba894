"""LSVD (the LPLR paper's SVD variant): L = Q(U_r), then R = Q'(argmin_Z ||L Z - W||_F).

The left factor is DSVD's; the right factor is refit to the *quantized* left factor, which
absorbs part of L's quantization error (so LSVD is never worse than DSVD before R is quantized).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, register
from lrsweep.methods.lplr import least_squares
from lrsweep.methods.svd import SVDOptions, truncated_svd


@dataclass
class LSVDOptions(SVDOptions):
    pass


@register("lsvd", LSVDOptions)
def lsvd(W: torch.Tensor, o: LSVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
         stats: LayerStats | None = None) -> LowRank:
    U, _, _, solver = truncated_svd(W, rank, o.driver)
    L = o.quantize(U.float(), bits)
    R = o.quantize(least_squares(L.value, W.float()), bits)
    return LowRank.of(L, R, solver=solver)
