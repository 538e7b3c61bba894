"""SVD-LLM's closed-form update (method=svdllm method.update=true): the refitted left factor is the
least-squares optimum for the shifted inputs, and the schedule feeds it the compressed predecessors'."""

from __future__ import annotations

import copy

import pytest
import torch

from lrsweep import models, provenance, schedule
from lrsweep.compress import compress_matrix
from lrsweep.context import Context
from lrsweep.methods import LayerStats
from lrsweep.methods.svdllm import update_left

from conftest import FAST

CALIB = ["calib.n_samples=8", "calib.batch_size=8", "calib.seq_len=32"]
SMALL_LLAMA = ["model=llama7b_random", "model.num_layers=2", "model.random_init.hidden_size=64",
               "model.random_init.intermediate_size=160", "model.random_init.num_attention_heads=4",
               "model.random_init.num_key_value_heads=4", "model.random_init.vocab_size=30528"]


def _data(n=12, d=10, N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = torch.randn(N, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    # what compressed predecessors produce
    Xs = X * torch.linspace(2, 0.5, d, dtype=torch.float64) + 0.3 * torch.randn(N, d, generator=g, dtype=torch.float64)
    return W, X, Xs


def _stats(X, Xs):
    return LayerStats(xtx=X.T @ X, n_tokens=len(X), shifted=LayerStats.from_inputs(Xs))


def test_update_left_is_the_least_squares_optimum():
    """U = argmin ||(W - U B) X'^T||: equals lstsq on the data, and its residual is orthogonal to B X'^T."""
    W, _, Xs = _data()
    B = torch.randn(4, W.shape[1], dtype=torch.float64)
    U = update_left(W, B, Xs.T @ Xs)
    ref = torch.linalg.lstsq(Xs @ B.T, Xs @ W.T).solution.T
    assert torch.allclose(U, ref, atol=1e-9)
    resid = (W - U @ B) @ Xs.T
    assert (resid @ (B @ Xs.T).T).abs().max() < 1e-8  # the normal equations hold


def test_update_lowers_the_shifted_output_error_and_keeps_the_right_factor():
    W, X, Xs = _data()
    plain = compress_matrix(W, "svdllm", rank=4, bits=32, stats=LayerStats(xtx=X.T @ X, n_tokens=len(X)))
    upd = compress_matrix(W, "svdllm", rank=4, bits=32, update=True, stats=_stats(X, Xs))

    def err(f):
        return float(((W - f.reconstruct().double()) @ Xs.T).norm())

    assert err(upd) < 0.99 * err(plain)
    # the update changes only U: both reconstructions span the same rows (those of S V^T C^-1)
    R0, R1 = plain.stored["R"].value.double(), upd.stored["R"].value.double()
    assert torch.allclose(R0, R1, atol=1e-5)
    assert upd.info["update_tokens"] == len(Xs)
    # any other U does worse on the shifted inputs (the closed form is the optimum over U)
    L = upd.stored["L"].value.double()
    for _ in range(5):
        other = L + 1e-2 * torch.randn_like(L)
        assert float(((W - other @ R1) @ Xs.T).norm()) > err(upd)


def test_update_on_the_dense_inputs_changes_nothing():
    """With X' = X the whitened truncation is already optimal over U: the update returns it."""
    W, X, _ = _data()
    plain = compress_matrix(W, "svdllm", rank=5, bits=32, stats=LayerStats(xtx=X.T @ X, n_tokens=len(X)))
    upd = compress_matrix(W, "svdllm", rank=5, bits=32, update=True, stats=_stats(X, X))
    assert torch.allclose(upd.reconstruct().double(), plain.reconstruct().double(), atol=1e-5)


def test_exact_low_rank_weight_is_recovered_exactly():
    W, X, Xs = _data()
    W = W[:, :3] @ torch.randn(3, W.shape[1], dtype=torch.float64)  # rank 3
    f = compress_matrix(W, "svdllm", rank=3, bits=32, update=True, stats=_stats(X, Xs))
    assert torch.allclose(f.reconstruct().double(), W, atol=1e-5)


def test_update_without_shifted_statistics_is_a_clear_error():
    W, X, _ = _data()
    with pytest.raises(ValueError, match="shifted=LayerStats"):
        compress_matrix(W, "svdllm", rank=3, bits=32, update=True, inputs=X)


@pytest.mark.parametrize("overrides,key", [(["stream=true"], "stream"),
                                            (["allocation=spectrum", "param_ratio=0.5", "calib.sequential=true"],
                                             "allocation")])
def test_update_refuses_what_it_cannot_run(config_error, tmp_path, overrides, key):
    msg = config_error("method=svdllm", "method.update=true", *overrides, f"results_dir={tmp_path}")
    assert msg is not None and msg.startswith(f"lrsweep: config error: {key}:") and "\n" not in msg


@pytest.mark.slow
def test_schedule_feeds_the_compressed_predecessors_inputs(minilm, compose, tmp_path):
    """Block 0 sees dense inputs (update = no change); block 1 is refitted to the compressed block 0."""
    model, tok = minilm
    base = [*FAST, *CALIB, "method=svdllm", "rank=8", r"model.targets='encoder\.layer\.[01]\..*'",
            f"cache_dir={tmp_path}/cache"]
    out = {}
    for update in (False, True):
        cfg = compose([*base, f"method.update={str(update).lower()}"])
        m = copy.deepcopy(model)
        ctx = Context(cfg, tok, "cpu", str(tmp_path / "cache"), provenance.model_key(cfg))
        res, info = schedule.compress(m, models.target_modules(m, cfg.model.targets), ctx, progress=False)
        out[update] = ({r.name: r.rel_err for r in res}, {r.name: r.info for r in res}, info)
    errs0, errs1 = out[False][0], out[True][0]
    assert out[True][2]["shifted"] and out[True][2]["sequential"]
    block0 = [n for n in errs0 if n.startswith("encoder.layer.0.")]
    block1 = [n for n in errs0 if n.startswith("encoder.layer.1.")]
    assert all(errs1[n] == pytest.approx(errs0[n], rel=1e-3) for n in block0)
    assert any(abs(errs1[n] - errs0[n]) > 1e-3 for n in block1)
    assert all(out[True][1][n]["update_tokens"] > 0 for n in block1)


def test_an_allocation_picks_the_ranks_the_update_compresses_at(compose, tmp_path):
    """allocation=spectrum with the update: the ranks are chosen on the dense statistics, the blocks are
    then compressed in turn at the ranks that ship, and block 1 is refitted to the compressed block 0."""
    cfg = compose([*FAST, *SMALL_LLAMA, *CALIB, "method=svdllm", "method.update=true", "param_ratio=0.5",
                   "allocation=spectrum", f"cache_dir={tmp_path}/cache"])
    m, tok = models.load(cfg.model, "cpu", str(tmp_path / "cache"))
    ctx = Context(cfg, tok, "cpu", str(tmp_path / "cache"), provenance.model_key(cfg))
    res, info = schedule.compress(m, models.target_modules(m, cfg.model.targets), ctx, progress=False)
    alloc = info["allocation"]
    assert info["shifted"] and info["sequential"] and alloc["strategy"] == "spectrum"
    assert alloc["candidate_ranks"] != alloc["uniform_ranks"]
    shipped = alloc["candidate_ranks"] if alloc["shipped"] == "spectrum" else alloc["uniform_ranks"]
    assert {r.name: r.rank for r in res} == shipped
    assert all(r.info["update_tokens"] > 0 for r in res if r.name.startswith("model.layers.1."))


def test_paper_preset_turns_the_update_on(compose):
    from test_protocol import NEWS_CALIB, NEWS_EVAL

    from lrsweep.validate import validate

    cfg = compose(["experiment=svdllm_update_paper", "model=smollm2", "param_ratio=0.8", *NEWS_EVAL, *NEWS_CALIB],
                  hydra_cfg=True)
    assert cfg.method.name == "svdllm" and cfg.method["update"] is True
    assert cfg.hydra.sweeper.params.param_ratio == "0.8,0.6,0.4" and cfg.calib.n_samples == 256
    cfg.hydra = None
    validate(cfg)
