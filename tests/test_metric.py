"""Each method's ``metric`` hook: the matrix M it truncates maps back to W, and dropping M's σ_i costs
σ_i² of the method's own error (checked on exact low-rank weights, against the error's definition)."""

from __future__ import annotations

import pytest
import torch

from lrsweep import allocate, methods
from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, Metric
from lrsweep.quant import quantize


def output_error(E, stats, o):  # ‖E Xᵀ‖² = tr(E XᵀX Eᵀ)
    return float(((E @ stats.xtx) * E).sum())


def column_error(alpha):  # ‖E diag(absmean^alpha)‖²
    return lambda E, stats, o: float((E * stats.absmean ** alpha).pow(2).sum())


def fisher_error(E, stats, o):  # ‖diag(w) E‖² (side output) or ‖E diag(w)‖² (side input), w = (Σ F)^power
    side, power = o.get("side", "output"), o.get("power", 0.5)
    w = stats.fisher.sum(1 if side == "output" else 0) ** power
    return float((E * (w[:, None] if side == "output" else w)).pow(2).sum())


# (method, options, the method's error of E = W - Ŵ by its definition, whether M whitens the inputs)
CASES = [("svdllm", {}, output_error, True), ("drone", {}, output_error, True),
         ("caldera", {}, output_error, True), ("lqer", {}, output_error, True),
         ("lqer", {"metric": "lqer"}, column_error(1.0), False),
         ("asvd", {}, column_error(0.5), False), ("asvd", {"alpha": 0.25}, column_error(0.25), False),
         ("fwsvd", {}, fisher_error, False), ("fwsvd", {"side": "input"}, fisher_error, False),
         ("fwsvd", {"power": 0.25}, fisher_error, False)]


def low_rank_layer(k: int = 3, n: int = 10, d: int = 8):
    """An exact rank-k weight (fp64) and full-rank calibration statistics of its inputs."""
    g = torch.Generator().manual_seed(k)
    W = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, d, generator=g, dtype=torch.float64)
    X = torch.randn(300, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    stats = LayerStats.from_inputs(X)
    stats.fisher = torch.rand(n, d, generator=g, dtype=torch.float64) + 0.1
    return W, stats, X


def test_every_method_with_a_metric_is_checked_here():
    assert {name for name, spec in methods.REGISTRY.items() if spec.metric} == {c[0] for c in CASES}


@pytest.mark.parametrize("method,opts,error,whitened", CASES)
def test_metric_maps_back_and_costs_the_dropped_singular_values(method, opts, error, whitened):
    k = 3
    W, stats, X = low_rank_layer(k)
    m = methods.REGISTRY[method].metric(W, stats, **opts)
    M = m.matrix().double()
    assert torch.allclose(m.back(M).double(), W, atol=1e-5 * float(W.abs().max()))  # full rank: W exactly
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    assert float(S[k:].max()) <= 1e-5 * float(S[0])  # rank k in the metric too
    s2 = S.pow(2)
    for r in range(k + 1):  # the rank-r truncation drops σ_{r+1}..σ_k: it costs Σ σ_i² of the method's error
        W_r = m.back((U[:, :r] * S[:r]) @ Vh[:r]).double()
        assert error(W - W_r, stats, opts) == pytest.approx(float(s2[r:].sum()), rel=1e-4, abs=1e-6 * float(s2[0]))
    assert m.whitened == whitened
    if whitened:  # each right singular vector carries unit input energy: Σ_t (v_iᵀ C⁻¹ x_t)² = 1
        for i in range(k):
            unit = m.back(torch.outer(U[:, i], Vh[i])).double() @ X.T
            assert float(unit.pow(2).sum()) == pytest.approx(1.0, rel=1e-4)


def scaled_plugin(W, *, rank, bits=16, seed=0, stats=None, power=1.0):
    """A method outside the package: the truncated SVD of W diag(c), c_j = j^power, in fp32."""
    c = torch.arange(1, W.shape[1] + 1, dtype=torch.float32) ** power
    U, S, Vh = torch.linalg.svd(W.float() * c, full_matrices=False)
    return LowRank.of(quantize(U[:, :rank] * S[:rank], 32), quantize(Vh[:rank] / c, 32))


def _plugin_metric(W, stats, power=1.0):
    c = torch.arange(1, W.shape[1] + 1, dtype=W.dtype) ** power
    return Metric(lambda: W * c, lambda A: A / c.to(A.dtype))


scaled_plugin.metric = _plugin_metric


def test_a_plugin_gives_its_metric_as_an_attribute():
    """A ``_target_`` function's ``metric`` attribute is its hook (options as keywords); without one, W itself."""
    W = low_rank_layer()[0]
    spec = methods.resolve("scaled", f"{__name__}.scaled_plugin")
    sp = allocate.spectrum(W, spec, None, {"power": 2.0})
    c = torch.arange(1, W.shape[1] + 1, dtype=torch.float64) ** 2
    want = torch.linalg.svdvals(W * c)  # the spectrum is computed in fp32
    assert torch.allclose(sp.S, want, rtol=1e-5, atol=1e-6 * float(want[0]))
    for r in (1, 3):  # the rank-r truncation of its metric is the method's rank-r output
        assert torch.allclose(sp.approx(r), spec.fn(W, rank=r, power=2.0).reconstruct(), atol=1e-4)
    plain = allocate.spectrum(W, methods.REGISTRY["svd"], None, {})
    want = torch.linalg.svdvals(W)
    assert torch.allclose(plain.S, want, rtol=1e-5, atol=1e-6 * float(want[0]))
