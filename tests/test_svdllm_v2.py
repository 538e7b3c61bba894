"""SVD-LLM V2 (method=svdllm_v2, allocation=svdllm_v2): eigen-whitened truncation and the per-matrix ratios."""

from __future__ import annotations

import math

import pytest
import torch

from lrsweep import methods
from lrsweep.allocate import Spectrum
from lrsweep.compress import compress_matrix
from lrsweep.methods.svdllm_v2 import eig_whitening
from lrsweep.allocate.rules import svdllm_v2
from lrsweep.models import layer_type


def _data(n=12, d=16, N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = torch.randn(N, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    return W, X


@pytest.mark.parametrize("N", [40, 9], ids=["full-rank", "fewer-tokens-than-columns"])
def test_output_error_is_the_sum_of_the_discarded_squared_singular_values(N):
    """||(W - W') X^T||^2 = Σ_{i>r} σ_i(W D)^2, also when X^T X is singular (no shift added)."""
    W, X = _data(N=N)
    xtx = X.T @ X
    D, _Dp = eig_whitening(xtx, 1e-10)
    assert D.shape[1] == min(N, X.shape[1])
    assert torch.allclose(D @ D.T, xtx, atol=1e-8 * float(xtx.abs().max()))
    S = torch.linalg.svdvals(W @ D)
    for r in (1, 3, 6):
        f = compress_matrix(W, "svdllm_v2", rank=r, bits=32, inputs=X)
        err = float(((W - f.reconstruct().double()) @ X.T).norm() ** 2)
        assert err == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-4, abs=1e-6)
        assert "cholesky_shift" not in f.info


def test_matches_cholesky_whitening_when_x_is_full_rank():
    W, X = _data()
    a = compress_matrix(W, "svdllm_v2", rank=4, bits=32, inputs=X).reconstruct().double()
    b = compress_matrix(W, "svdllm", rank=4, bits=32, inputs=X).reconstruct().double()
    assert torch.allclose(a @ X.T, b @ X.T, atol=1e-4)


def test_exact_low_rank_weight_is_recovered_on_the_calibration_inputs():
    W, X = _data()
    W = W[:, :3] @ torch.randn(3, W.shape[1], dtype=torch.float64)
    f = compress_matrix(W, "svdllm_v2", rank=3, bits=32, inputs=X)
    assert torch.allclose(f.reconstruct().double(), W, atol=1e-5)


def _spectrum(S):
    return Spectrum(torch.tensor(S, dtype=torch.float64), lambda r: None, "metric")


def test_ratio_rule_keeps_more_of_the_matrices_that_lose_more_within_the_budget():
    spec = methods.REGISTRY["svdllm_v2"]
    n = d = 64
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(3)] + ["model.layers.0.self_attn.q_proj"]
    shapes = dict.fromkeys(names, (n, d))
    u = methods.rank_for_param_ratio(spec, n, d, 0.6)
    uniform = dict.fromkeys(names, u)
    decay = {names[0]: 0.99, names[1]: 0.97, names[2]: 0.95, names[3]: 0.9}
    spectra = {nm: _spectrum([100 * decay[nm] ** i for i in range(64)]) for nm in names}

    def cost(nm, r):
        return spec.params(n, d, r)

    ranks, info = svdllm_v2(spec, shapes, uniform, spectra, cost, {})
    assert info["groups"] == 2
    assert ranks[names[3]] == u  # a group of one keeps its uniform rank
    assert ranks[names[0]] > ranks[names[1]] > ranks[names[2]]  # the flattest spectrum loses most: keeps most
    assert sum(cost(nm, ranks[nm]) for nm in names[:3]) <= 3 * cost(names[0], u)
    # the rule's removed fractions follow 1 / log(1 + L_i) within the group
    full = methods.rank_for_param_ratio(spec, n, d, 1.0)
    L = [math.sqrt(float(spectra[nm].tail()[u])) for nm in names[:3]]
    w = [1 / math.log1p(x) for x in L]
    c = [3 * (1 - u / full) * wi / sum(w) for wi in w]
    for nm, ci in zip(names[:3], c, strict=True):
        assert abs(ranks[nm] - full * (1 - ci)) <= 2


def test_layer_type_drops_the_block_index():
    assert layer_type("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert layer_type("lm_head") == "lm_head"


@pytest.mark.parametrize("overrides,key", [
    (["method=svdllm_v2", "~calib"], "calib"),
    (["allocation=svdllm_v2", "method=svdllm", "calib.n_samples=8"], "allocation"),
])
def test_bad_configs_exit_with_one_line(config_error, tmp_path, overrides, key):
    msg = config_error(*overrides, f"results_dir={tmp_path}")
    assert msg is not None and msg.startswith(f"lrsweep: config error: {key}:") and "\n" not in msg


@pytest.mark.slow
def test_allocation_svdllm_v2_runs_for_another_method(compose, minilm, tmp_path):
    """allocation=svdllm_v2 with method=svdllm on two MiniLM blocks: the rule's ranks, within the budget."""
    import copy

    from lrsweep import models, provenance, schedule
    from lrsweep.context import Context

    from conftest import FAST

    model, tok = minilm
    cfg = compose([*FAST, "method=svdllm", "allocation=svdllm_v2", "param_ratio=0.5", "calib.n_samples=8",
                   "calib.batch_size=8", "calib.seq_len=32", r"model.targets='encoder\.layer\.[0-2]\..*'"])
    m = copy.deepcopy(model)
    layers = models.target_modules(m, cfg.model.targets)
    ctx = Context(cfg, tok, "cpu", str(tmp_path / "cache"), provenance.model_key(cfg))
    res, info = schedule.compress(m, layers, ctx, progress=False)
    alloc = info["allocation"]
    assert alloc["strategy"] == "svdllm_v2" and alloc["svdllm_v2"]["groups"] == 6
    cand, uni = alloc["candidate_ranks"], alloc["uniform_ranks"]
    assert cand != uni
    assert sum(r * sum(layers[n].weight.shape) for n, r in cand.items()) <= \
        sum(r * sum(layers[n].weight.shape) for n, r in uni.items())
    shipped = cand if alloc["shipped"] == "svdllm_v2" else uni
    assert {r.name: r.rank for r in res} == shipped


def test_paper_preset_uses_its_ratios(compose):
    from test_protocol import NEWS_CALIB, NEWS_EVAL

    from lrsweep.validate import validate

    cfg = compose(["experiment=svdllm_v2_paper", "model=smollm2", "param_ratio=0.8", *NEWS_EVAL, *NEWS_CALIB],
                  hydra_cfg=True)
    assert cfg.method.name == "svdllm_v2" and cfg.allocation == "svdllm_v2"
    assert cfg.hydra.sweeper.params.param_ratio == "0.8,0.6,0.4" and cfg.calib.n_samples == 256
    cfg.hydra = None
    validate(cfg)
