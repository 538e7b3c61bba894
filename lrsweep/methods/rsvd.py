"""Randomized SVD (Halko, Martinsson, Tropp 2011) with oversampling and power iterations.

Omega ~ N(0, 1) (d x (r+p), p = ``oversample``, default max(10, r/2));  Y = W Omega;
q times: Q = qr(Y), Y = W (W^T Q) re-orthonormalized;  Q = qr(Y);  B = Q^T W;
(thin QRs by CholeskyQR2 when well conditioned, else Householder);  B = U_b S V^T;  U = Q U_b;
truncate to r. Seeded by ``seed`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, QuantizerOptions, register
from lrsweep.methods.lplr import tall_qr
from lrsweep.methods.svd import balanced, compute_dtype


def randomized_svd(W: torch.Tensor, rank: int, oversample: int | None = None, niter: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) of W by the HMT range finder (fp32; fp64 for fp64 input).

    The default oversampling max(10, r/2) with 2 power iterations keeps the error within ~0.5 %
    of the optimum on slowly decaying (i^-1/2) spectra, where p = 10 is ~1.4 % off.
    """
    W = W.to(compute_dtype(W))
    n, d = W.shape
    oversample = max(10, rank // 2) if oversample is None else oversample
    k = min(rank + oversample, n, d)
    gen = torch.Generator(device=W.device).manual_seed(seed)
    omega = torch.randn(d, k, generator=gen, device=W.device, dtype=W.dtype)
    Q = tall_qr(W @ omega)[0]
    for _ in range(niter):
        Z = tall_qr(W.T @ Q)[0]
        Q = tall_qr(W @ Z)[0]
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


@dataclass
class RSVDOptions(QuantizerOptions):
    oversample: int | None = None  # extra sketch columns p (sketch width r + p); None: max(10, r/2)
    niter: int = 2  # power iterations q (re-orthonormalized)


@register("rsvd", RSVDOptions, randomized=True)
def rsvd(W: torch.Tensor, o: RSVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
         stats: LayerStats | None = None) -> LowRank:
    oversample = max(10, rank // 2) if o.oversample is None else o.oversample
    U, S, Vh = randomized_svd(W, rank, oversample, o.niter, seed)
    L, R = balanced(U, S, Vh)
    return LowRank.of(o.quantize(L, bits), o.quantize(R, bits), solver=f"hmt(oversample={oversample},niter={o.niter})")
