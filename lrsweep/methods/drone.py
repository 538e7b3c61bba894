"""DRONE (Chen et al., NeurIPS 2021): data-aware low rank, min ||(W - L R) X^T||_F in closed form.

From the input statistic X^T X = V diag(lambda) V^T (i.e. X = U_X S V^T with S = sqrt(lambda)):
W X^T = (W V S) U_X^T, so the best rank-r W_hat is [W V S]_r S^+ V^T (pseudo-inverse on the
null space of X). Computed in fp64 from X^T X alone, so model code never holds activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, Metric, register, require
from lrsweep.methods.svd import SVDOptions, balanced, content_key, from_statistic, truncated_svd


def input_basis(xtx: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_k, s_k): the eigenvectors of X^T X with eigenvalue > rtol * max and sqrt of those eigenvalues."""
    lam, V = torch.linalg.eigh(xtx.double())
    keep = lam > rtol * lam.max().clamp_min(torch.finfo(torch.float64).tiny)
    if not keep.any():
        raise ValueError("drone: the xtx statistic is zero (no calibration signal)")
    return V[:, keep], lam[keep].sqrt()


def pad_rank(L: torch.Tensor, R: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors to ``rank`` columns/rows when the problem has lower rank than requested."""
    extra = rank - L.shape[1]
    if extra <= 0:
        return L, R
    return torch.nn.functional.pad(L, (0, extra)), torch.nn.functional.pad(R, (0, 0, 0, extra))


@dataclass
class DroneOptions(SVDOptions):
    rtol: float = 1e-12  # eigenvalues of X^T X below rtol * max are treated as zero (pseudo-inverse)


def layer_basis(W: torch.Tensor, stats: LayerStats | None, o: DroneOptions) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """(key, V, s): :func:`input_basis` of the layer's X^T X on W's device, derived once per statistic
    in a :func:`~lrsweep.methods.svd.reuse` scope."""
    xtx = require(stats, "xtx", "drone")
    key, (V, s) = from_statistic("drone basis", xtx, lambda: input_basis(xtx.to(W.device), o.rtol),
                                 str(W.device), o.rtol)
    return key, V, s


def metric(W: torch.Tensor, stats: LayerStats | None, o: DroneOptions) -> Metric:
    """M = W V S, whose truncation error is ‖(W - Ŵ) X^T‖_F (Ŵ = M_r S^+ V^T, W on X's row space)."""
    _, V, s = layer_basis(W, stats, o)
    return Metric(lambda: W.double() @ V * s, lambda A: ((A.double() / s) @ V.T).to(A.dtype), whitened=True)


@register("drone", DroneOptions, needs=("xtx",), metric=metric)
def drone(W: torch.Tensor, o: DroneOptions, *, rank: int, bits: int = 16, seed: int = 0,
          stats: LayerStats | None = None) -> LowRank:
    basis, V, s = layer_basis(W, stats, o)
    U, S, Vh, solver = truncated_svd(lambda: W.double() @ V * s, rank, o.driver,  # keyed by W and X^T X, not hashed
                                     key=lambda: (content_key(W), basis))
    L, R = balanced(U, S, (Vh / s) @ V.T)
    L, R = pad_rank(L, R, rank)
    return LowRank.of(o.quantize(L, bits), o.quantize(R, bits), solver=solver, input_rank=int(s.numel()))
