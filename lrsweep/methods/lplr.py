"""LPLR (Saha, Srivastava, Pilanci, NeurIPS 2023): randomized low-precision low-rank factorization.

S ~ N(0, 1/m) (d x m);  L = Q(W S) at b1 bits;  W* = argmin_Z ||L Z - W||_F;  R = Q'(W*) at b2 bits.

The least squares goes through a QR of the (tall, n x m) quantized L in the working precision
(CholeskyQR2: small GEMMs, Householder when L is ill-conditioned): one GEMM for W S, one for
Q^T W, and an m x m triangular solve, so LPLR costs about two GEMMs.
A rank-deficient L (possible at very low bits) falls back to a rank-revealing solver (gelsy, fp64).
The paper's rank rule: ``cr`` (with ``b_nq``, default ``bits``) sets the rank so that LPLR at
b1/b2 bits stores ``cr`` times the bits of naive ``b_nq``-bit quantization of W; it overrides ``rank``.
"""

from __future__ import annotations

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import LowRank
from lrsweep.methods import register
from lrsweep.quant import SUPPORTED_BITS, quantize, tensor_bits


def lplr_bits(n: int, d: int, rank: int, bits: int, b1: int | None = None, b2: int | None = None,
              scheme: str = "uniform", group_size: int = 128, **_) -> int:
    return tensor_bits((n, rank), b1 or bits, scheme, group_size) + tensor_bits((rank, d), b2 or bits, scheme, group_size)


def tall_qr(L: torch.Tensor, max_cond: float = 1e3) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall L: CholeskyQR2 (three small GEMMs, two triangular solves; as orthogonal as
    Householder while cond(L) <= max_cond) with Householder QR when L is worse conditioned."""
    R1, info = torch.linalg.cholesky_ex(L.T @ L, upper=True)
    diag = R1.diagonal().abs()
    if int(info) == 0 and bool(diag.min() * max_cond > diag.max()):
        Q1 = torch.linalg.solve_triangular(R1, L, upper=True, left=False)
        R2, info = torch.linalg.cholesky_ex(Q1.T @ Q1, upper=True)
        if int(info) == 0:
            return torch.linalg.solve_triangular(R2, Q1, upper=True, left=False), R2 @ R1
    return torch.linalg.qr(L)


def least_squares(L: torch.Tensor, W: torch.Tensor, rcond: float = 1e-5) -> torch.Tensor:
    """argmin_Z ||L Z - W||_F (fp32) through a QR of L; rank-revealing fp64 fallback when ill-conditioned."""
    L, W = L.float(), W.float()
    Q, Rl = tall_qr(L)
    diag = Rl.diagonal().abs()
    if diag.numel() and bool(diag.min() > rcond * diag.max()):
        return torch.linalg.solve_triangular(Rl, Q.T @ W, upper=True)
    if L.device.type == "cpu":
        return torch.linalg.lstsq(L.double(), W.double(), driver="gelsy").solution.float()
    return (torch.linalg.pinv(L.double()) @ W.double()).float()


def cr_rank(n: int, d: int, cr: float, b1: int, b2: int, b_nq: int) -> int:
    """The paper's rank rule: LPLR at b1/b2 bits uses cr times the bits of b_nq-bit naive quantization."""
    return int(cr * n * d * b_nq // (n * b1 + d * b2))


def rank_rule(n: int, d: int, bits: int, cr: float | None = None, b1: int | None = None, b2: int | None = None,
              b_nq: int | None = None, **_) -> int | None:
    return None if cr is None else cr_rank(n, d, cr, b1 or bits, b2 or bits, b_nq or bits)


def check(n: int, d: int, cr: float | None = None, b1: int | None = None, b2: int | None = None,
          b_nq: int | None = None, **_) -> None:
    for key, b in (("b1", b1), ("b2", b2), ("b_nq", b_nq)):
        if b is not None and b not in SUPPORTED_BITS:
            raise ConfigError(f"method.{key}", f"{b!r} is not supported", ["null", "2..15", 16, 32])
    if cr is not None and (not isinstance(cr, int | float) or cr <= 0):
        raise ConfigError("method.cr", f"{cr!r} must be a positive ratio or null")


@register("lplr", storage_bits=lplr_bits, rank_rule=rank_rule, check=check)
def lplr(W: torch.Tensor, *, rank: int, bits: int = 16, seed: int = 0, stats=None, b1: int | None = None,
         b2: int | None = None, cr: float | None = None, b_nq: int | None = None, scheme: str = "uniform",
         group_size: int = 128) -> LowRank:
    n, d = W.shape
    rank = rank_rule(n, d, bits, cr, b1, b2, b_nq) or rank
    b1, b2 = b1 or bits, b2 or bits
    W = W.float()
    gen = torch.Generator(device=W.device).manual_seed(seed)
    S = torch.randn(d, rank, generator=gen, device=W.device) / rank**0.5
    L = quantize(W @ S, b1, scheme, group_size)
    R = quantize(least_squares(L.value, W), b2, scheme, group_size)
    return LowRank.of(L, R, b1=b1, b2=b2, sketch="gaussian")
