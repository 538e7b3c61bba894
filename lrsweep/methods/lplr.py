"""LPLR (Saha, Srivastava, Pilanci, NeurIPS 2023): randomized low-precision low-rank factorization.

S ~ N(0, 1/m) (d x m);  L = Q(W S) at b1 bits;  W* = argmin_Z ||L Z - W||_F;  R = Q'(W*) at b2 bits.
"""

from __future__ import annotations

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import register
from lrsweep.quant import quantize, tensor_bits


def lplr_bits(n: int, d: int, rank: int, bits: int, b1: int | None = None, b2: int | None = None,
              scheme: str = "uniform", group_size: int = 128, **_) -> int:
    return tensor_bits((n, rank), b1 or bits, scheme, group_size) + tensor_bits((rank, d), b2 or bits, scheme, group_size)


def least_squares(L: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """argmin_Z ||L Z - W||_F through a QR factorization of L (rank-revealing on CPU)."""
    if L.device.type == "cpu":
        return torch.linalg.lstsq(L.double(), W.double(), driver="gelsy").solution.float()
    Q, Rl = torch.linalg.qr(L)
    return torch.linalg.solve_triangular(Rl, Q.T @ W, upper=True)


def cr_rank(n: int, d: int, cr: float, b1: int, b2: int, b_nq: int) -> int:
    """The paper's rank rule: LPLR at b1/b2 bits uses cr times the bits of b_nq-bit naive quantization."""
    return int(cr * n * d * b_nq // (n * b1 + d * b2))


@register("lplr", storage_bits=lplr_bits)
def lplr(W: torch.Tensor, *, rank: int, bits: int = 16, seed: int = 0, stats=None,
         b1: int | None = None, b2: int | None = None, scheme: str = "uniform", group_size: int = 128) -> LowRank:
    b1, b2 = b1 or bits, b2 or bits
    W = W.float()
    n, d = W.shape
    gen = torch.Generator(device=W.device).manual_seed(seed)
    S = torch.randn(d, rank, generator=gen, device=W.device) / rank**0.5
    L = quantize(W @ S, b1, scheme, group_size)
    R = quantize(least_squares(L.value, W), b2, scheme, group_size)
    return LowRank.of(L, R, b1=b1, b2=b2)
