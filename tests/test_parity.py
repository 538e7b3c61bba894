"""Parity with the reference implementations (issue #13): fwsvd's weighted side, asvd's randomized
solver, and the per-sample Fisher estimator against per-sample backward passes."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import FAST
from lrsweep import calib, compress_matrix
from lrsweep.errors import ConfigError
from lrsweep.validate import validate

N, D = 12, 8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, w: torch.Tensor, side: str) -> float:
    """||diag(w)(W − Ŵ)||_F (side=output) or ||(W − Ŵ) diag(w)||_F (side=input)."""
    E = W.double() - W_hat.double()
    return float(torch.linalg.norm(E * (w[:, None] if side == "output" else w[None, :])))


def optimum(W: torch.Tensor, w: torch.Tensor, side: str, rank: int) -> float:
    """Eckart-Young in the weighted norm: the tail singular values of the row- or column-scaled W."""
    scaled = W.double() * (w[:, None] if side == "output" else w[None, :])
    return float(torch.linalg.svdvals(scaled)[rank:].square().sum().sqrt())


def side_weights(F: torch.Tensor, side: str) -> torch.Tensor:
    return F.double().sum(1 if side == "output" else 0).sqrt()


@pytest.mark.parametrize("side", ["output", "input"])
def test_fwsvd_with_a_flat_fisher_on_its_side_is_svd(side):
    """Fisher whose row sums (output) / column sums (input) are all equal: every weight is the same."""
    W = torch.randn(N, D, generator=gen(0), dtype=torch.float64)
    F = torch.rand(N, D, generator=gen(1), dtype=torch.float64)
    F = F / F.sum(1, keepdim=True) if side == "output" else F / F.sum(0, keepdim=True)
    f = compress_matrix(W, "fwsvd", rank=3, bits=32, fisher=F, side=side).reconstruct()
    torch.testing.assert_close(f, compress_matrix(W, "svd", rank=3, bits=32).reconstruct(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(f, compress_matrix(W, "fwsvd", rank=3, bits=32, fisher=F,
                                                 side="input" if side == "output" else "output").reconstruct(),
                              atol=1e-3)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_fwsvd_minimizes_its_weighted_objective_exactly(side, rank):
    W = torch.randn(N, D, generator=gen(rank), dtype=torch.float64)
    F = (torch.rand(N, D, generator=gen(10 + rank), dtype=torch.float64)
         * torch.logspace(-3, 2, N, dtype=torch.float64)[:, None])
    F = F if side == "output" else F.T.reshape(N, D)  # uneven importance on the weighted side either way
    w = side_weights(F, side)
    W_hat = compress_matrix(W, "fwsvd", rank=rank, bits=32, fisher=F, side=side).reconstruct()
    err = weighted_error(W, W_hat, w, side)
    assert err == pytest.approx(optimum(W, w, side, rank), rel=1e-5)
    # brute force: no rank-`rank` matrix from random factors, nor any small step from the optimum, does better
    g = gen(99)
    for _ in range(200):
        L = torch.randn(N, rank, generator=g, dtype=torch.float64)
        R = torch.randn(rank, D, generator=g, dtype=torch.float64)
        assert weighted_error(W, L @ R, w, side) >= err
        U, S, Vh = torch.linalg.svd(W_hat.double())
        bump = (U[:, :rank] + 1e-3 * torch.randn(N, rank, generator=g, dtype=torch.float64)) * S[:rank]
        assert weighted_error(W, bump @ Vh[:rank], w, side) >= err * (1 - 1e-9)
    other = "input" if side == "output" else "output"
    W_other = compress_matrix(W, "fwsvd", rank=rank, bits=32, fisher=F, side=other).reconstruct()
    assert weighted_error(W, W_other, w, side) > err * (1 + 1e-6)  # the side is not a detail


@pytest.mark.parametrize("side", ["output", "input"])
def test_fwsvd_zero_fisher_rows_are_guarded(side):
    W = torch.randn(N, D, generator=gen(3), dtype=torch.float64)
    F = torch.rand(N, D, generator=gen(4), dtype=torch.float64)
    if side == "output":
        F[[2, 7]] = 0
    else:
        F[:, [1, 5]] = 0
    fact = compress_matrix(W, "fwsvd", rank=3, bits=32, fisher=F, side=side)
    W_hat = fact.reconstruct()
    assert all(torch.isfinite(q.value).all() for q in fact.stored.values())
    w = side_weights(F, side)  # zero on the dead rows: the objective ignores them
    assert weighted_error(W, W_hat, w, side) == pytest.approx(optimum(W, w, side, 3), rel=1e-4, abs=1e-8)
    with pytest.raises(ValueError, match="all zero"):
        compress_matrix(W, "fwsvd", rank=3, bits=32, fisher=torch.zeros(N, D), side=side)


def test_fwsvd_power_and_bad_options():
    W = torch.randn(N, D, generator=gen(5), dtype=torch.float64)
    F = torch.rand(N, D, generator=gen(6), dtype=torch.float64) * torch.logspace(-2, 2, D, dtype=torch.float64)
    quarter = compress_matrix(W, "fwsvd", rank=2, bits=32, fisher=F, side="input", power=0.25).reconstruct()
    w = F.sum(0) ** 0.25  # ASVD4LLM's fisher scaling: (mean_i F_ij)^(alpha/2), a mean only rescales w
    assert weighted_error(W, quarter, w, "input") == pytest.approx(optimum(W, w, "input", 2), rel=1e-5)
    with pytest.raises(ConfigError, match=re.escape("method.side")):
        compress_matrix(W, "fwsvd", rank=2, fisher=F, side="rows")
    with pytest.raises(ConfigError, match=re.escape("method.power")):
        compress_matrix(W, "fwsvd", rank=2, fisher=F, power=0)


# ---------------------------------------------------------------- asvd: the reference's randomized solver
def _asvd_inputs(seed: int = 0):
    g = gen(seed)
    W = torch.randn(40, 24, generator=g)
    X = torch.randn(300, 24, generator=g) * torch.logspace(-1, 1, 24)
    return W, X


def test_asvd_lowrank_is_the_reference_svd_lowrank():
    W, X = _asvd_inputs()
    got = compress_matrix(W, "asvd", rank=6, bits=32, inputs=X, solver="lowrank", seed=3)
    s = X.double().abs().mean(0).pow(0.5).float()
    torch.manual_seed(3)
    U, S, V = torch.svd_lowrank(W * s, q=6, niter=2)
    torch.testing.assert_close(got.reconstruct(), (U * S) @ (V.T / s), atol=1e-5, rtol=1e-4)
    assert got.info["solver"] == "torch.svd_lowrank[niter=2]"
    again = compress_matrix(W, "asvd", rank=6, bits=32, inputs=X, solver="lowrank", seed=3)
    assert torch.equal(again.reconstruct(), got.reconstruct())  # seeded, not the global RNG's state
    exact = compress_matrix(W, "asvd", rank=6, bits=32, inputs=X)
    assert exact.info["solver"] == "torch.linalg.svd"
    scaled_err = lambda f: float(torch.linalg.norm((W - f.reconstruct()) * s))  # noqa: E731
    assert scaled_err(exact) <= scaled_err(got) * (1 + 1e-6)  # randomized: never better than exact


def test_asvd_lowrank_recovers_an_exact_low_rank_matrix():
    g = gen(7)
    W = torch.randn(40, 5, generator=g) @ torch.randn(5, 24, generator=g)
    _, X = _asvd_inputs(1)
    got = compress_matrix(W, "asvd", rank=5, bits=32, inputs=X, solver="lowrank").reconstruct()
    torch.testing.assert_close(got, W, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match=re.escape("method.solver")):
        compress_matrix(W, "asvd", rank=5, inputs=X, solver="randomized")


def test_bad_method_options_fail_before_launch(compose, tmp_path):
    for overrides, key in ((["method=fwsvd", "method.side=rows"], "method.side"),
                           (["method=asvd", "method.solver=svds"], "method.solver"),
                           (["method=fwsvd", "calib.fisher=token"], "calib.fisher")):
        with pytest.raises(ConfigError) as e:
            validate(compose([*FAST, *overrides, f"results_dir={tmp_path}"]))
        assert e.value.key == key, overrides


# ---------------------------------------------------------------- the per-sample Fisher
def _masked_mean_sq(m, b):
    """Each text's own loss: the mean over its real tokens of its squared hidden states."""
    h = m(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state
    mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h.pow(2) * mask).sum((1, 2)) / mask.sum((1, 2))


NAMES = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
         "encoder.layer.1.output.dense"]


def test_sample_fisher_equals_per_sample_backward_passes(minilm):
    model, tok = minilm
    layers = {n: model.get_submodule(n) for n in NAMES}
    texts = [["a short one", "a much longer sentence, with quite a few more tokens in it"], ["third text here"]]
    batches = [dict(tok(t, padding=True, return_tensors="pt")) for t in texts]
    stats = calib.collect(model, layers, batches, ("fisher",), "cpu", _masked_mean_sq, "sample")
    weights = [layers[n].weight for n in NAMES]
    expected = [0] * len(NAMES)
    alone = [0] * len(NAMES)
    for b, group in zip(batches, texts, strict=True):
        losses = _masked_mean_sq(model, b)
        for i in range(len(losses)):  # B backward passes, one per sample, in the padded batch
            grads = torch.autograd.grad(losses[i], weights, retain_graph=True)
            expected = [e + g.double() ** 2 for e, g in zip(expected, grads, strict=True)]
        for t in group:  # and each text on its own, unpadded: the padding masks are honoured
            grads = torch.autograd.grad(_masked_mean_sq(model, dict(tok([t], return_tensors="pt")))[0], weights)
            alone = [a + g.double() ** 2 for a, g in zip(alone, grads, strict=True)]
    for n, e, a in zip(NAMES, expected, alone, strict=True):
        torch.testing.assert_close(stats[n].fisher, e.float(), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(stats[n].fisher, a.float(), rtol=2e-3, atol=1e-9)
    batch = calib.collect(model, layers, batches, ("fisher",), "cpu", _masked_mean_sq, "batch")
    assert not torch.allclose(batch[NAMES[0]].fisher, stats[NAMES[0]].fisher, rtol=1e-2)
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_sample_fisher_refuses_a_layer_called_twice(minilm):
    model, tok = minilm
    name = NAMES[0]
    lin = model.get_submodule(name)
    b = dict(tok(["two calls"], return_tensors="pt"))

    def twice(m, batch):
        return _masked_mean_sq(m, batch) + lin(torch.ones(1, batch["input_ids"].shape[1], 384)).sum()

    with pytest.raises(RuntimeError, match="more than once"):
        calib.collect(model, {name: lin}, [b], ("fisher",), "cpu", twice, "sample")


def test_lm_loss_is_each_windows_mean_nll():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    ids = torch.randint(0, 64, (3, 10), generator=gen(0))
    loss = calib.sources._lm_loss(model, [], "cpu")
    per = loss(model, {"input_ids": ids})
    assert per.shape == (3,)
    with torch.no_grad():
        torch.testing.assert_close(per.mean(), model(input_ids=ids, labels=ids).loss)
        one = model(input_ids=ids[1:2], labels=ids[1:2]).loss
        padded = torch.cat([ids[1:2, :7], torch.zeros(1, 3, dtype=ids.dtype)], 1)
        mask = torch.tensor([[1] * 7 + [0] * 3])
        short = model(input_ids=ids[1:2, :7], labels=ids[1:2, :7]).loss
    torch.testing.assert_close(per[1], one)
    torch.testing.assert_close(loss(model, {"input_ids": padded, "attention_mask": mask})[0], short,
                               rtol=1e-5, atol=1e-6)


def test_the_estimator_is_part_of_the_cache_key(compose):
    key = lambda *o: calib.stats_key(compose(["method=fwsvd", *o]), {"path": "m"}, ("fisher",))  # noqa: E731
    assert key()["fisher"] == "sample" and key("calib.fisher=batch")["fisher"] == "batch"
    assert key() != key("calib.fisher=batch")
    assert "fisher" not in calib.stats_key(compose(["method=asvd"]), {"path": "m"}, ("absmean",))  # others keep theirs
