"""allocation=fisher: singular components valued by their K-FAC-diagonal loss estimate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrsweep import allocate, methods
from lrsweep.context import Context
from lrsweep.methods import LayerStats
from lrsweep.methods import svd as svd_mod


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, input_ids):
        return self.b(torch.tanh(self.a(input_ids)))


def test_output_fisher_is_the_summed_squared_output_gradient(compose, tmp_path):
    model = Tiny()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randn(3, 4, 6, generator=g)} for _ in range(2)]

    def loss_fn(m, batch):  # per-sample losses
        return m(batch["input_ids"]).pow(2).mean(dim=(1, 2))

    cfg = compose([f"cache_dir={tmp_path}", "+calib=default"])
    ctx = Context(cfg, None, "cpu", str(tmp_path), {"model": "tiny"})
    layers = {"a": model.a, "b": model.b}
    G, m, info = allocate.output_fisher(model, layers, ["a", "b"], ctx, loss_fn, batches)
    want_G = {"a": torch.zeros(8, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    want_m = {"a": torch.zeros(6, dtype=torch.float64), "b": torch.zeros(8, dtype=torch.float64)}
    for batch in batches:
        x = batch["input_ids"]
        ya = model.a(x)
        ya.retain_grad()
        h = torch.tanh(ya)
        yb = model.b(h)
        yb.retain_grad()
        loss_fn(lambda _, out=yb: out, batch).sum().backward()
        want_G["a"] += ya.grad.double().pow(2).sum((0, 1))
        want_G["b"] += yb.grad.double().pow(2).sum((0, 1))
        want_m["a"] += x.double().pow(2).sum((0, 1))
        want_m["b"] += h.detach().double().pow(2).sum((0, 1))
        model.zero_grad()
    for n in layers:
        assert torch.allclose(G[n], want_G[n], rtol=1e-5)
        assert torch.allclose(m[n], want_m[n], rtol=1e-5)
    assert not any(p.requires_grad is False for p in model.parameters())  # restored
    assert info["tokens"] == 24 and not info["cache_hit"]
    assert allocate.output_fisher(model, layers, ["a", "b"], ctx, loss_fn, batches)[2]["cache_hit"]


def test_fisher_gains_formula():
    g = torch.Generator().manual_seed(2)
    W, X = torch.randn(7, 5, generator=g), torch.randn(50, 5, generator=g)
    stats = LayerStats.from_inputs(X)
    G, m = torch.rand(7, generator=g).double(), X.double().pow(2).sum(0)
    for method, whitened in (("svd", False), ("svdllm", True)):
        with svd_mod.reuse():
            sp = allocate.method_spectrum(W, methods.REGISTRY[method], stats, {}, bits=32, seed=0)
        got = allocate.fisher_gains({"w": sp}, {"w": G}, {"w": m}, whitened)["w"]
        for i in range(5):
            u, v, s = sp.U[:, i].double(), sp.Vh[i].double(), float(sp.S[i])
            inp = 1.0 if whitened else float((v ** 2 * m).sum())
            assert got[i] == pytest.approx(s ** 2 * float((u ** 2 * G).sum()) * inp, rel=1e-6)
    if True:  # whitened: the input factor is exactly Σ_t (v_iᵀ C⁻¹ x_t)² = 1 (no shift needed here)
        C = torch.linalg.cholesky(stats.xtx.double())
        Vh = torch.linalg.svd(W.double() @ C, full_matrices=False)[2]
        z = torch.linalg.solve_triangular(C, X.double().T, upper=False)  # C⁻¹ x_t
        assert torch.allclose((Vh @ z).pow(2).sum(1), torch.ones(5, dtype=torch.float64), atol=1e-8)


def test_a_layer_the_loss_ignores_gets_the_least_rank():
    g = torch.Generator().manual_seed(3)
    spectra = {}
    for n in ("x", "y"):
        with svd_mod.reuse():
            spectra[n] = allocate.method_spectrum(torch.randn(6, 6, generator=g), methods.REGISTRY["svd"], None, {},
                                                  bits=32, seed=0)
    G = {"x": torch.zeros(6, dtype=torch.float64), "y": torch.ones(6, dtype=torch.float64)}
    m = {n: torch.ones(6, dtype=torch.float64) for n in spectra}
    value = allocate.fisher_gains(spectra, G, m, whitened=False)
    assert value["x"].sum() == 0 and value["y"].min() > 0


def test_a_run_with_fisher_allocation(compose, tmp_path, monkeypatch):
    from conftest import FAST
    from lrsweep.job import run

    monkeypatch.setitem(allocate.CHECK_SAMPLES, "encoder", 64)  # the check's plumbing, not its power
    cfg = compose([*FAST, "param_ratio=0.5", "allocation=fisher", "method=svdllm", "calib.n_samples=16",
                   "model.targets='encoder\\.layer\\.[01]\\..*'", f"results_dir={tmp_path}", "logger=none",
                   "eval.latency.repeats=1", "eval.latency.shapes=[]"])
    row = run(cfg)
    assert row.status == "ok", row.error
    info = row.extra["allocation"]
    assert row.allocation == "fisher" and info["shipped"] in ("fisher", "uniform")
    assert info["fisher"]["samples"] == 16 and info["fisher"]["seconds"] >= 0
    assert 0 < info["seconds"]["check_forward"] <= info["seconds"]["check"] <= info["seconds"]["total"]
    assert row.param_ratio_measured <= 0.5
    assert info["candidate_ranks"] != info["uniform_ranks"]
    # the check's probe is fitted on other held-out texts than the ones it scores (as the evaluation's)
    assert info["check_fit_samples"] == info["check_samples"] == allocate.CHECK_SAMPLES["encoder"]
    assert info["loss_difference_se"] > 0
    better = info["loss_candidate"] - info["loss_uniform"] + info["loss_difference_se"] < 0
    assert info["shipped"] == ("fisher" if better else "uniform")
