"""LSVD (the LPLR paper's SVD variant): L = Q(U_r), then R = Q'(argmin_Z ||L Z - W||_F).

The left factor is DSVD's; the right factor is refit to the *quantized* left factor, which
absorbs part of L's quantization error (so LSVD is never worse than DSVD before R is quantized).
"""

from __future__ import annotations

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import register
from lrsweep.methods.lplr import least_squares
from lrsweep.methods.svd import truncated_svd
from lrsweep.quant import quantize


@register("lsvd")
def lsvd(W: torch.Tensor, *, rank: int, bits: int = 16, seed: int = 0, stats=None,
         scheme: str = "uniform", group_size: int = 128, driver: str = "auto") -> LowRank:
    U, _, _, solver = truncated_svd(W, rank, driver)
    L = quantize(U.float(), bits, scheme, group_size)
    R = quantize(least_squares(L.value, W.float()), bits, scheme, group_size)
    return LowRank.of(L, R, solver=solver)
