"""CALDERA (Saha et al., NeurIPS 2024): W ~ Q + L R with Q, L and R all at low precision.

Starting from L R = 0, each of ``iters`` rounds sets
  Q    <- GPTQ(W - L R)                      (Q at ``bits``; LDLQ is GPTQ's update),
  L, R <- rank-``rank`` fit of A = W - Q in the H = X^T X metric, at ``lr_bits`` (LPLR-style):
          the whitened truncated SVD of A (SVD-LLM's Cholesky whitening) quantized, then ``lr_iters``
          alternations L <- quant(argmin_L ||(L R - A) X^T||) = quant(A H R^T (R H R^T)^-1),
          R <- quant(argmin_R ||(L R - A) X^T||) = quant((L^T L)^-1 L^T A), best one kept
          (with fp16/fp32 factors the whitened SVD is already optimal: no alternation).
The iterate with the smallest output error tr((W - W_hat) H (W - W_hat)^T) is returned (the
alternation is not monotone); ``info.errors`` lists each round's error relative to tr(W H W^T).
The first round is LQER with ``quantizer: gptq``, ``metric: qera``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import QuantLowRank
from lrsweep.methods import LayerStats, Metric, QuantizerOptions, register, require
from lrsweep.methods.gptq import GPTQOptions, gptq_quantize, quantized_part
from lrsweep.methods.lplr import least_squares
from lrsweep.methods.lqer import check_lr_bits, in_w_order, qlr_bits
from lrsweep.methods.svdllm import svdllm, whitened
from lrsweep.quant import FLOAT_BITS, QTensor


@dataclass
class CalderaOptions(GPTQOptions):  # scheme and group_size: of Q, L and R
    lr_bits: int = 4  # bits of L and R: 2..15, 16 (fp16), 32
    iters: int = 15  # rounds of Q / L R updates
    lr_iters: int = 5  # alternating least-squares rounds of the quantized L, R fit (0 with float lr_bits)
    shift: float = 1e-6  # X^T X + shift * mean(diag) when not positive definite (x10 per retry)

    @property
    def quantizer(self) -> str:
        """Q is always GPTQ's (what :func:`lrsweep.methods.lqer.qlr_bits` counts)."""
        return "gptq"


def check(n: int, d: int, o: CalderaOptions) -> None:
    for key, value in (("iters", o.iters), ("lr_iters", o.lr_iters)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "iters" else 0):
            raise ConfigError(f"method.{key}", f"{value!r} must be an integer >= {1 if key == 'iters' else 0}")
    check_lr_bits(n, d, o)


class OutputError:
    """||(A - L R) X^T||_F^2 = tr(A H A^T) - 2 <L, A H R^T> + <L^T L, R H R^T> for one A, without an n x d product
    per candidate (A H is computed once)."""

    def __init__(self, A: torch.Tensor, H: torch.Tensor):
        self.A, self.H = A, H
        self.AH = A @ H
        self.base = float((A.double() * self.AH.double()).sum())

    def __call__(self, L: torch.Tensor, R: torch.Tensor) -> float:
        cross = float((L.double() * (self.AH @ R.T).double()).sum())
        quad = float(((L.T @ L).double() * (R @ self.H @ R.T).double()).sum())
        return self.base - 2 * cross + quad


def fit_lowrank(A: torch.Tensor, H: torch.Tensor, stats: LayerStats, rank: int, lr_bits: int, o: QuantizerOptions,
                lr_iters: int, shift: float) -> tuple[QTensor, QTensor, float, dict]:
    """(L, R, output error, info): the rank-``rank`` fit of A in the H metric with L, R at ``lr_bits``
    (quantized as ``o`` says)."""
    init = svdllm(A, rank=rank, bits=32, stats=stats, shift=shift, scheme=o.scheme, group_size=o.group_size)
    L, R = init.stored["L"].value, init.stored["R"].value
    error = OutputError(A, H)
    Lq, Rq = o.quantize(L, lr_bits), o.quantize(R, lr_bits)  # LQER's factors
    best = (Lq, Rq, error(Lq.value, Rq.value))
    for _ in range(0 if lr_bits in FLOAT_BITS else lr_iters):
        RHR = (R @ H @ R.T).double()
        L = torch.linalg.lstsq(RHR, (error.AH @ R.T).double().T).solution.T.float()  # RHR symmetric
        Lq = o.quantize(L, lr_bits)
        Rq = o.quantize(least_squares(Lq.value, A), lr_bits)
        e = error(Lq.value, Rq.value)
        if e < best[2]:
            best = (Lq, Rq, e)
        L, R = Lq.value, Rq.value
    return *best, init.info


def metric(W: torch.Tensor, stats: LayerStats | None, o: CalderaOptions) -> Metric:
    """The output error in the H = X^T X metric (SVD-LLM's whitening)."""
    return whitened(W, stats, o.shift, "caldera")


@register("caldera", CalderaOptions, needs=("xtx",), storage_bits=qlr_bits, check=check, params=None,
          metric=metric)
def caldera(W: torch.Tensor, o: CalderaOptions, *, rank: int, bits: int = 2, seed: int = 0,
            stats: LayerStats | None = None) -> QuantLowRank:
    xtx = require(stats, "xtx", "caldera").to(W.device)
    W = W.float()
    H = xtx.float()
    total = float(((W @ H) * W).sum()) or 1.0
    LR = torch.zeros_like(W)
    best, errors = None, []
    for _ in range(o.iters):
        Q, perm, qinfo = gptq_quantize(W - LR, xtx, bits, o.scheme, o.group_size, o.damp, o.act_order, **o.rule,
                                       scale_error=o.scale_error)
        A = W - in_w_order(Q, perm)
        L, R, err, linfo = fit_lowrank(A, H, LayerStats(xtx=xtx), rank, o.lr_bits, o, o.lr_iters, o.shift)
        LR = L.value @ R.value
        errors.append(err / total)
        if best is None or err < best[0]:
            best = (err, Q, perm, L, R, {**qinfo, **linfo})
    _, Q, perm, L, R, info = best
    return QuantLowRank.of({**quantized_part(Q, perm), "L": L, "R": R}, lr_bits=o.lr_bits, iters=o.iters,
                           lr_iters=o.lr_iters, best_iter=errors.index(min(errors)), errors=errors, **info)
