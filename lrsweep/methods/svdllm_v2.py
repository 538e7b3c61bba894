"""SVD-LLM V2 (Wang et al., NAACL 2025): loss-optimized truncation, whitening by the eigendecomposition
(an SVD of the symmetric PSD matrix) of X^T X instead of its Cholesky factor.

X^T X = Q Λ Q^T (fp64); the directions with λ > tol · λ_max are kept (k of them), D = Q_k Λ_k^1/2
(d x k), D^+ = Λ_k^-1/2 Q_k^T. SVD of W D = U S V^T; L = U_r S_r^1/2, R = S_r^1/2 V_r^T D^+.
Then ||(W - L R) X^T||_F^2 = Σ_{i>r} σ_i^2 exactly, also when X^T X is singular (fewer calibration
tokens than columns): no shift is added (svdllm adds one to make Cholesky work). The map is zero
on the directions no calibration token reaches; the rank is at most min(n, k).

Its heterogeneous per-matrix ratios are the allocation strategy ``allocation=svdllm_v2``
(:mod:`lrsweep.allocate.rules`), which any method with a spectrum can use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, register, require
from lrsweep.methods.svd import SVDOptions, balanced, content_key, from_statistic, truncated_svd


def eig_whitening(xtx: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, D^+) with D D^T = X^T X restricted to its eigenvalues above ``tol`` x the largest (fp64)."""
    A = xtx.double()
    lam, Q = torch.linalg.eigh((A + A.T) / 2)
    keep = lam > tol * lam.max().clamp_min(0)
    if not bool(keep.any()):
        raise ValueError("svdllm_v2: X^T X is zero (no calibration signal reaches this layer)")
    root = lam[keep].sqrt()
    Qk = Q[:, keep]
    return Qk * root, (Qk / root).T


@dataclass
class SVDLLMV2Options(SVDOptions):
    tol: float = 1e-10  # eigenvalues of X^T X below tol * the largest count as zero (directions dropped)


@register("svdllm_v2", SVDLLMV2Options, needs=("xtx",))
def svdllm_v2(W: torch.Tensor, o: SVDLLMV2Options, *, rank: int, bits: int = 16, seed: int = 0,
              stats: LayerStats | None = None) -> LowRank:
    xtx = require(stats, "xtx", "svdllm_v2")
    key, (D, Dp) = from_statistic("svdllm_v2 eigh", xtx, lambda: eig_whitening(xtx.to(W.device), o.tol),
                                  str(W.device), o.tol)
    U, S, Vh, solver = truncated_svd(lambda: W.double() @ D, rank, o.driver, key=lambda: (content_key(W), key))
    L, R = balanced(U, S, Vh.double() @ Dp)
    return LowRank.of(o.quantize(L, bits), o.quantize(R, bits), solver=solver, whitened_dims=int(D.shape[1]))
