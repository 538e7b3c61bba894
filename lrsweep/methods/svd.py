"""Truncated SVD (Eckart-Young): L = U_r S_r^1/2, R = S_r^1/2 V_r^T, each quantized at ``bits``."""

from __future__ import annotations

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import register
from lrsweep.quant import quantize


def split_svd(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``rank`` factors (L, R) of the truncated SVD of W (computed in fp32+)."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()


@register("svd")
def svd(W: torch.Tensor, *, rank: int, bits: int = 16, seed: int = 0, stats=None,
        scheme: str = "uniform", group_size: int = 128) -> LowRank:
    L, R = split_svd(W, rank)
    return LowRank.of(quantize(L, bits, scheme, group_size), quantize(R, bits, scheme, group_size), solver="torch.linalg.svd")
