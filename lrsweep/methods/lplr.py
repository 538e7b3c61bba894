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

from dataclasses import dataclass

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, QuantizerOptions, register
from lrsweep.quant import SUPPORTED_BITS


@dataclass
class LPLROptions(QuantizerOptions):
    b1: int | None = None  # bits of L (None: bits)
    b2: int | None = None  # bits of R (None: bits)
    cr: float | None = None  # paper's rank rule: bits = cr x naive b_nq-bit quantization; overrides rank
    b_nq: int | None = None  # bits of the naive quantization cr compares with (None: bits)


def lplr_bits(n: int, d: int, rank: int, bits: int, o: LPLROptions) -> int:
    return o.tensor_bits((n, rank), o.b1 or bits) + o.tensor_bits((rank, d), o.b2 or bits)


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


def rank_rule(n: int, d: int, bits: int, o: LPLROptions) -> int | None:
    return None if o.cr is None else cr_rank(n, d, o.cr, o.b1 or bits, o.b2 or bits, o.b_nq or bits)


def check(n: int, d: int, o: LPLROptions) -> None:
    for key, b in (("b1", o.b1), ("b2", o.b2), ("b_nq", o.b_nq)):
        if b is not None and b not in SUPPORTED_BITS:
            raise ConfigError(f"method.{key}", f"{b!r} is not supported", ["null", "2..15", 16, 32])
    if o.cr is not None and (not isinstance(o.cr, int | float) or o.cr <= 0):
        raise ConfigError("method.cr", f"{o.cr!r} must be a positive ratio or null")


@register("lplr", LPLROptions, storage_bits=lplr_bits, rank_rule=rank_rule, check=check, randomized=True)
def lplr(W: torch.Tensor, o: LPLROptions, *, rank: int, bits: int = 16, seed: int = 0,
         stats: LayerStats | None = None) -> LowRank:
    n, d = W.shape
    rank = rank_rule(n, d, bits, o) or rank
    b1, b2 = o.b1 or bits, o.b2 or bits
    W = W.float()
    gen = torch.Generator(device=W.device).manual_seed(seed)
    S = torch.randn(d, rank, generator=gen, device=W.device) / rank**0.5
    L = o.quantize(W @ S, b1)
    R = o.quantize(least_squares(L.value, W), b2)
    return LowRank.of(L, R, b1=b1, b2=b2, sketch="gaussian")
