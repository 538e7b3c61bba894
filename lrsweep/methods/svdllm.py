"""SVD-LLM (Wang et al., ICLR 2025): truncation-aware whitening by the Cholesky factor of X^T X.

X^T X = C C^T (C lower, fp64); SVD of W C = U S V^T; L = U_r S_r^1/2, R = S_r^1/2 V_r^T C^-1.
Then ||(W - L R) X^T||_F equals the truncation error of W C. X^T X is often only positive
semi-definite: a shift lambda * mean(diag) is added (lambda = shift, x10 per retry) and recorded.

``update=true``: SVD-LLM's layer-wise closed-form update (ICLR 2025; ``whitening_local_update`` in
AIoT-MLSys-Lab/SVD-LLM). The right factor B = S_r V_r^T C^-1 stays (whitened by the dense model's
X^T X); the left one is refitted to the inputs X' that the compressed earlier blocks produce:
U = argmin_U ||(W - U B) X'^T||_F = W G' B^T (B G' B^T)^+ with G' = X'^T X' (:func:`update_left`).
The schedule gives X'^T X' as ``stats.shifted`` (block by block, :mod:`lrsweep.schedule`).
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


def update_left(W: torch.Tensor, B: torch.Tensor, shifted_xtx: torch.Tensor) -> torch.Tensor:
    """The U (n x r) minimizing ||(W - U B) X'^T||_F for fixed B (r x d), given G' = X'^T X' (fp64):
    the normal equations U (B G' B^T) = W G' B^T, solved with the pseudo-inverse (B X'^T may lack rank)."""
    G = shifted_xtx.to(W.device).double()
    B = B.double()
    GB = G @ B.T  # d x r
    return (W.double() @ GB) @ torch.linalg.pinv(B @ GB, hermitian=True)


@dataclass
class SVDLLMOptions(SVDOptions):
    shift: float = 1e-6  # on non-PD X^T X add shift * mean(diag) (x10 per retry); recorded in the row
    update: bool = False  # SVD-LLM's closed-form update of U to the inputs of the compressed predecessors


def metric(W: torch.Tensor, stats: LayerStats | None, o: SVDLLMOptions) -> Metric:
    return whitened(W, stats, o.shift)


def _wants_shifted(o: SVDLLMOptions) -> bool:
    return o.update


@register("svdllm", SVDLLMOptions, needs=("xtx",), metric=metric, shifted=_wants_shifted)
def svdllm(W: torch.Tensor, o: SVDLLMOptions, *, rank: int, bits: int = 16, seed: int = 0,
           stats: LayerStats | None = None) -> LowRank:
    if o.update and (stats is None or stats.shifted is None or stats.shifted.xtx is None):
        raise ValueError("svdllm update=true needs the statistics of the inputs the compressed earlier layers "
                         "produce (stats=LayerStats(xtx=X.T @ X, shifted=LayerStats(xtx=X'.T @ X')); in a sweep "
                         "the schedule collects them block by block)")
    factor, C, added = cholesky_factor(W, stats, o.shift)
    U, S, Vh, solver = truncated_svd(lambda: W.double() @ C, rank, o.driver,  # W C keyed by W and C, not hashed
                                     key=lambda: (content_key(W), factor))
    Vh = torch.linalg.solve_triangular(C, Vh.double(), upper=False, left=False)
    info = {}
    if o.update:  # U refitted to the shifted inputs for B = S V^T C^-1 (kept); split as U S^1/2, S^1/2 V^T C^-1
        U = update_left(W, S.double()[:, None] * Vh, stats.shifted.xtx)
        info["update_tokens"] = stats.shifted.n_tokens
    L, R = balanced(U, S, Vh)
    return LowRank.of(o.quantize(L, bits), o.quantize(R, bits), solver=solver, cholesky_shift=added, **info)
