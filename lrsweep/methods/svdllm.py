"""SVD-LLM (Wang et al., ICLR 2025): truncation-aware whitening by the Cholesky factor of X^T X.

X^T X = C C^T (C lower, fp64); SVD of W C = U S V^T; L = U_r S_r^1/2, R = S_r^1/2 V_r^T C^-1.
Then ||(W - L R) X^T||_F equals the truncation error of W C. X^T X is often only positive
semi-definite: a shift lambda * mean(diag) is added (lambda = shift, x10 per retry) and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, Metric, register, require
from lrsweep.methods.svd import SVDOptions, balanced, content_key, from_statistic, truncated_svd


def cholesky_shifted(xtx: torch.Tensor, shift: float, tries: int = 12) -> tuple[torch.Tensor, float]:
    """(C, added) with C C^T = X^T X + added * I, lower triangular, fp64; added = 0 when PD."""
    A = xtx.double()
    A = (A + A.T) / 2
    scale = float(A.diagonal().mean()) or 1.0
    added = 0.0
    for attempt in range(tries + 1):
        C, info = torch.linalg.cholesky_ex(A + added * torch.eye(A.shape[0], dtype=A.dtype, device=A.device))
        if int(info) == 0 and torch.isfinite(C).all():
            return C, added
        added = shift * scale * 10**attempt
    raise ValueError(f"svdllm: X^T X is not positive definite even after a shift of {added:.3g}")


def cholesky_factor(W: torch.Tensor, stats: LayerStats | None, shift: float,
                    method: str = "svdllm") -> tuple[tuple, torch.Tensor, float]:
    """(key, C, added): :func:`cholesky_shifted` of the layer's X^T X on W's device, derived once per
    statistic and shift in a :func:`~lrsweep.methods.svd.reuse` scope."""
    xtx = require(stats, "xtx", method)
    key, (C, added) = from_statistic("svdllm cholesky", xtx, lambda: cholesky_shifted(xtx.to(W.device), shift),
                                     str(W.device), shift)
    return key, C, added


def whitened(W: torch.Tensor, stats: LayerStats | None, shift: float, method: str = "svdllm") -> Metric:
    """The output-error metric: M = W C, whose truncation error is ‖(W - Ŵ) X^T‖_F (Ŵ = M_r C^-1)."""
    _, C, _ = cholesky_factor(W, stats, shift, method)
    return Metric(lambda: W.double() @ C,
                  lambda A: torch.linalg.solve_triangular(C, A.double(), upper=False, left=False).to(A.dtype),
                  whitened=True)


@dataclass
class SVDLLMOptions(SVDOptions):
    shift: float = 1e-6  # on non-PD X^T X add shift * mean(diag) (x10 per retry); recorded in the row


def metric(W: torch.Tensor, stats: LayerStats | None, o: SVDLLMOptions) -> Metric:
    return whitened(W, stats, o.shift)


@register("svdllm", SVDLLMOptions, needs=("xtx",), metric=metric)
def svdllm(W: torch.Tensor, o: SVDLLMOptions, *, rank: int, bits: int = 16, seed: int = 0,
           stats: LayerStats | None = None) -> LowRank:
    factor, C, added = cholesky_factor(W, stats, o.shift)
    U, S, Vh, solver = truncated_svd(lambda: W.double() @ C, rank, o.driver,  # W C keyed by W and C, not hashed
                                     key=lambda: (content_key(W), factor))
    Vh = torch.linalg.solve_triangular(C, Vh.double(), upper=False, left=False)
    L, R = balanced(U, S, Vh)
    return LowRank.of(o.quantize(L, bits), o.quantize(R, bits), solver=solver, cholesky_shift=added)
