"""A layer's spectrum in its method's error metric: what every allocation strategy ranks.

The singular values σ_i of the matrix M the method truncates (its ``metric`` hook; W itself for a
method without one): dropping σ_i costs σ_i² of the method's error. Read from the method's own
decomposition when it truncates one through :func:`lrsweep.methods.svd.truncated_svd`
(:func:`method_spectrum`), otherwise computed here from the hook (:func:`spectrum`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lrsweep.compress import factorization_key, factorize
from lrsweep.methods import LayerStats, MethodSpec, Metric
from lrsweep.methods import svd as _svd


@dataclass
class Spectrum:
    """A layer's singular values in the method's error metric and its weight at any rank."""

    S: torch.Tensor  # fp64, descending
    approx: Callable[[int], torch.Tensor]  # rank -> the layer's (reconstructed) weight at that rank
    source: str  # "method": the method's own SVD (and output); "metric": computed here (no reusable SVD)
    U: torch.Tensor | None = None  # left singular vectors (columns) of the truncated matrix
    Vh: torch.Tensor | None = None  # right singular vectors (rows)
    forget: Callable[[int], None] = lambda r: None  # drop the method's result at rank r kept by approx(r)

    def tail(self) -> np.ndarray:
        """e[r] = Σ_{i>r} σ_i² for r = 0..len(S)."""
        s2 = (self.S ** 2).cpu().numpy()
        return np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])


def method_spectrum(W: torch.Tensor, spec: MethodSpec, stats: LayerStats | None, opts: dict[str, Any],
                    bits: int, seed: int) -> Spectrum | None:
    """The spectrum the method itself truncates, read by running it once at rank 1 inside an active
    :func:`lrsweep.methods.svd.reuse` scope (which keeps its full SVD for the real compression);
    ``approx(r)`` is the method's own result at rank r (quantization included), reusing that SVD; the
    result is kept in the scope, so the compression at the rank that ships does not run the method again.
    None when the method decomposes no matrix through ``truncated_svd`` (randomized or iterative ones)."""
    svd = _svd.decomposed(lambda: spec.fn(W, rank=1, bits=bits, seed=seed, stats=stats, **opts))
    if svd is None:
        return None
    U, S, Vh, _ = svd

    def approx(r: int) -> torch.Tensor:
        return factorize(spec, W, opts, r, bits, seed, stats, share=True).reconstruct()

    def forget(r: int) -> None:
        _svd.forget("factorizations", factorization_key(spec, W, opts, r, bits, seed, stats))

    return Spectrum(S.detach().double().cpu(), approx, "method", U, Vh, forget)


def metric(W: torch.Tensor, spec: MethodSpec, stats: LayerStats | None, opts: dict[str, Any]) -> Metric:
    """The method's :class:`~lrsweep.methods.Metric` for W (W itself for a method without the hook)."""
    if spec.metric is None:
        return Metric(lambda: W, lambda A: A)
    return spec.metric(W, stats, **opts)


def spectrum(W: torch.Tensor, spec: MethodSpec, stats: LayerStats | None, opts: dict[str, Any]) -> Spectrum:
    """The singular values of the matrix the method truncates, computed here (methods whose own
    decomposition :func:`method_spectrum` cannot read); the weight at rank r is the rank-r truncation
    of that matrix mapped back to W's space. Inside a :func:`lrsweep.methods.svd.reuse` scope, layers
    reading the same statistic share what the method derives from it (a Cholesky factor)."""
    m = metric(W.detach(), spec, stats, opts)
    U, S, Vh = torch.linalg.svd(m.matrix().float(), full_matrices=False)

    def approx(r: int) -> torch.Tensor:
        return m.back((U[:, :r] * S[:r]) @ Vh[:r])

    return Spectrum(S.double(), approx, "metric", U, Vh)
