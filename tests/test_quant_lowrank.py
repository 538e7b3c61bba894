"""Quantization plus low rank: gptq, lqer, caldera (W ~ Q + L R) — property tests on small shapes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import lrsweep
from conftest import FAST
from faultlib.cli import TINY
from lrsweep import models
from lrsweep.compress import compress_matrix, compress_model
from lrsweep.errors import ConfigError
from lrsweep.factorization import QuantLowRank, QuantLowRankLinear
from lrsweep.methods import REGISTRY, LayerStats
from lrsweep.quant import quantize, tensor_bits
from lrsweep.save import save_compressed
from test_methods import stored_bits

N, D = 48, 160


def correlated_inputs(d: int = D, tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels of uneven scale (like a transformer's hidden states)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    return (torch.randn(tokens, d, generator=g) @ mix) * torch.rand(d, generator=g).add(0.2)


def weight(seed: int = 1, outliers: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, D, generator=g) / D**0.5
    return W + outliers * torch.randn(N, 2, generator=g) @ torch.randn(2, D, generator=g) / D**0.5


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W - W_hat) @ X.T) / torch.linalg.norm(W @ X.T))


X = correlated_inputs()


# ---- gptq ---------------------------------------------------------------------------------------


# Not (2 bits, group, no act_order): the feedback grows a group's absmax before its scale is taken,
# and the symmetric 2-bit grid {-2, -1, 0, 1} * scale has no room for it; GPTQ lands above RTN there.
@pytest.mark.parametrize("bits, scheme, act_order", [
    (b, s, a) for b in (2, 3, 4) for s in ("uniform", "channel", "group") for a in (False, True)
    if (b, s, a) != (2, "group", False)])
def test_gptq_beats_round_to_nearest_at_equal_bits(scheme, act_order, bits):
    W = weight()
    f = compress_matrix(W, "gptq", bits=bits, inputs=X, scheme=scheme, group_size=32, act_order=act_order)
    rtn = quantize(W, bits, scheme, 32)
    assert output_error(W, f.reconstruct(), X) < 0.95 * output_error(W, rtn.value, X)
    perm = 0 if not (act_order and scheme == "group") else D * (D - 1).bit_length()
    assert f.storage_bits == rtn.storage_bits + perm == REGISTRY["gptq"].storage_bits(
        N, D, 0, bits, scheme=scheme, group_size=32, act_order=act_order)
    Q = f.stored["Q"]  # the layout quantize() gives: same codes dtype, same scale shapes
    assert Q.codes.dtype == rtn.codes.dtype and {k: v.shape for k, v in Q.meta.items()} == \
        {k: v.shape for k, v in rtn.meta.items()}


def test_gptq_on_uncorrelated_unit_inputs_is_round_to_nearest():
    """H = c I: no error to feed back anywhere, so GPTQ rounds every column to nearest."""
    W = weight()
    f = compress_matrix(W, "gptq", bits=3, stats=LayerStats(xtx=torch.eye(D, dtype=torch.float64) * 7),
                        scheme="channel", act_order=False)
    torch.testing.assert_close(f.reconstruct(), quantize(W, 3, "channel", grid="best").value)  # gptq's default grid


@pytest.mark.parametrize("scheme", ["uniform", "channel", "group"])
@pytest.mark.parametrize("grid, observer", [("narrow", "absmax"), ("full", "mse"), ("tight", "mse"), ("auto", "mse"),
                                            ("best", "absmax"), ("best", "mse")])
def test_gptq_rounds_on_quantizes_grid_rule_and_observer(scheme, grid, observer):
    """H = c I again: whatever the grid rule and observer, gptq's Q is quantize()'s with them (its group
    scales, chosen as each group starts, see the weights quantize sees), and the output error its
    searches minimize (scale_error output, the default) weighs every column alike: the plain search's."""
    W = weight(outliers=3.0)
    H = torch.eye(D, dtype=torch.float64) * 7
    f = compress_matrix(W, "gptq", bits=3, stats=LayerStats(xtx=H), scheme=scheme, group_size=32, act_order=False,
                        grid=grid, observer=observer)
    q = quantize(W, 3, scheme, 32, grid=grid, observer=observer)
    torch.testing.assert_close(f.reconstruct(), q.value)
    assert torch.equal(f.stored["Q"].codes, q.codes)


@pytest.mark.parametrize("scheme", ["uniform", "channel", "group"])
@pytest.mark.parametrize("grid", ["best", "tight"])
def test_gptq_weighs_a_heavy_input_channel(scheme, grid):
    """H diagonal (no feedback: GPTQ rounds to nearest) with one input channel 1000 times the others':
    the mse search on the output error keeps that column's rounding error below the plain search's
    (scale_error weight), and the output error tr(D H D^T) falls."""
    W = weight(outliers=3.0)
    W[0, 5] = 1.5 * float(W.abs().max())  # the tensor's, row's and group's extreme: the plain search clips it
    h = torch.ones(D, dtype=torch.float64)
    h[5] = 1000.0
    H = torch.diag(h)
    f = {e: compress_matrix(W, "gptq", bits=3, stats=LayerStats(xtx=H), scheme=scheme, group_size=32,
                            act_order=False, grid=grid, observer="mse", scale_error=e) for e in ("output", "weight")}
    col = {e: float((v.reconstruct() - W)[:, 5].square().sum()) for e, v in f.items()}
    out = {e: float(((v.reconstruct() - W) @ H.float() * (v.reconstruct() - W)).sum()) for e, v in f.items()}
    assert col["output"] < 0.7 * col["weight"] and out["output"] < out["weight"], (col, out)


@pytest.mark.parametrize("bits, scheme", [(3, "group"), (4, "group"), (3, "channel")])
def test_gptq_with_the_mse_observer_at_most_without(bits, scheme):
    """On a layer with outlier directions and correlated inputs, the mse observer's group scales lower
    gptq's output error (and the default grid's is below the narrow grid's), at the same stored bits."""
    W = weight(outliers=3.0)
    err = {}
    for grid, observer in (("narrow", "absmax"), ("auto", "absmax"), ("auto", "mse")):
        f = compress_matrix(W, "gptq", bits=bits, inputs=X, scheme=scheme, group_size=32, grid=grid, observer=observer)
        err[grid, observer] = (output_error(W, f.reconstruct(), X), f.storage_bits)
    assert err["auto", "mse"][0] < err["auto", "absmax"][0] < err["narrow", "absmax"][0]
    assert len({bits for _, bits in err.values()}) == 1


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_default_best_and_output_weighted_mse(bits, act_order):
    """On a layer with outlier directions and correlated inputs (channels of uneven scale): the default
    (grid best, chosen on the output error) is below grid auto; the mse search on the output error is
    below the default, and below the plain mse search (scale_error weight)."""
    W = weight(outliers=3.0)
    opts = dict(bits=bits, inputs=X, scheme="group", group_size=32, act_order=act_order)
    err = {(g, o, e): output_error(
        W, compress_matrix(W, "gptq", grid=g, observer=o, scale_error=e, **opts).reconstruct(), X)
           for g, o, e in (("auto", "absmax", "output"), ("best", "absmax", "output"), ("best", "mse", "output"),
                           ("best", "mse", "weight"))}
    assert compress_matrix(W, "gptq", **opts).reconstruct().equal(
        compress_matrix(W, "gptq", grid="best", observer="absmax", scale_error="output", **opts).reconstruct())
    assert err["best", "mse", "output"] < err["best", "absmax", "output"] < err["auto", "absmax", "output"], err
    assert err["best", "mse", "output"] < err["best", "mse", "weight"], err


@pytest.mark.parametrize("scale_error", ["output", "weight"])
def test_lqer_and_caldera_take_gptqs_scale_search(scale_error):
    """lqer's gptq quantizer and caldera's first Q are gptq's Q with the same grid, observer and scale_error."""
    W = weight(outliers=3.0)
    opts = dict(bits=3, inputs=X, scheme="group", group_size=32, grid="best", observer="mse")
    Q = compress_matrix(W, "gptq", scale_error=scale_error, **opts).stored["Q"]
    other = compress_matrix(W, "gptq", scale_error={"output": "weight", "weight": "output"}[scale_error], **opts)
    assert not torch.equal(other.stored["Q"].codes, Q.codes)  # the option changes Q on this layer
    lqer = compress_matrix(W, "lqer", rank=4, quantizer="gptq", scale_error=scale_error, **opts)
    caldera = compress_matrix(W, "caldera", rank=4, iters=1, lr_iters=0, scale_error=scale_error, **opts)
    for f in (lqer, caldera):
        assert torch.equal(f.stored["Q"].codes, Q.codes) and torch.equal(f.stored["Q"].meta["scale"], Q.meta["scale"])


def test_gptq_zeroes_columns_that_never_see_an_input():
    Xd = X.clone()
    Xd[:, :5] = 0
    f = compress_matrix(weight(), "gptq", bits=4, inputs=Xd, scheme="group", group_size=32)
    assert f.info["dead_columns"] == 5 and (f.reconstruct()[:, :5] == 0).all()


# ---- lqer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["qera", "lqer"])
@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_lqer_below_its_quantizer_and_falling_with_rank(metric, quantizer):
    W = weight()
    base = quantize(W, 3, "group", 32, grid="best") if quantizer == "rtn" else \
        compress_matrix(W, "gptq", bits=3, inputs=X, scheme="group", group_size=32)
    base_err = output_error(W, base.value if quantizer == "rtn" else base.reconstruct(), X)
    errs = [output_error(W, compress_matrix(W, "lqer", rank=r, bits=3, inputs=X, metric=metric, quantizer=quantizer,
                                            scheme="group", group_size=32).reconstruct(), X) for r in (2, 8, 24, 48)]
    assert errs[0] < base_err and all(a > b for a, b in itertools.pairwise(errs)), (base_err, errs)


def test_qera_is_the_output_error_optimum_of_the_residual():
    """QERA's fit (fp32 factors) is the best rank-r correction in output error: below LQER's scaling
    and below the plain SVD of the residual, and exact when the residual has rank r."""
    W = weight()
    errs = {m: output_error(W, compress_matrix(W, "lqer", rank=8, bits=3, lr_bits=32, inputs=X, metric=m,
                                               scheme="group", group_size=32).reconstruct(), X)
            for m in ("qera", "lqer")}
    Q = quantize(W, 3, "group", 32, grid="best").value  # lqer's default grid (gptq's options)
    U, S, Vh = torch.linalg.svd(W - Q)
    plain = output_error(W, Q + (U[:, :8] * S[:8]) @ Vh[:8], X)
    assert errs["qera"] < errs["lqer"] and errs["qera"] < plain
    # X of rank 8: the residual seen through X has rank <= 8 and QERA removes all of it
    X8 = X[:, :8] @ torch.randn(8, D)
    f = compress_matrix(W, "lqer", rank=8, bits=3, lr_bits=32, inputs=X8, shift=1e-9, scheme="group", group_size=32)
    assert output_error(W, f.reconstruct(), X8) < 1e-3


# ---- caldera ------------------------------------------------------------------------------------


@pytest.mark.parametrize("outliers", [0.0, 3.0])
def test_caldera_no_worse_than_its_first_iterate_which_is_lqer_with_gptq(outliers):
    W = weight(outliers=outliers)
    opts = dict(rank=8, bits=2, lr_bits=4, inputs=X, scheme="group", group_size=32)
    f = compress_matrix(W, "caldera", iters=4, lr_iters=3, **opts)
    first = compress_matrix(W, "caldera", iters=1, lr_iters=3, **opts)
    lqer = compress_matrix(W, "lqer", quantizer="gptq", **opts)
    err = output_error(W, f.reconstruct(), X)
    assert len(f.info["errors"]) == 4 and f.info["errors"][0] == pytest.approx(first.info["errors"][0])
    assert err ** 2 == pytest.approx(min(f.info["errors"]), rel=1e-3)  # the recorded errors are the real ones
    assert err <= output_error(W, first.reconstruct(), X) + 1e-7
    assert output_error(W, first.reconstruct(), X) <= output_error(W, lqer.reconstruct(), X) + 1e-7


def test_caldera_alternation_improves_the_quantized_factors():
    """At 2-bit factors the alternating least squares beats the quantized whitened SVD (LQER's factors)."""
    W = weight()
    opts = dict(rank=8, bits=3, lr_bits=2, inputs=X, scheme="group", group_size=32, iters=1)
    plain, alternated = (compress_matrix(W, "caldera", lr_iters=k, **opts) for k in (0, 5))
    assert alternated.info["errors"][0] < plain.info["errors"][0]


# ---- storage, determinism, module, bad options ----------------------------------------------------


@pytest.mark.parametrize("method, opts", [
    ("lqer", {}), ("lqer", {"quantizer": "gptq"}), ("lqer", {"quantizer": "gptq", "act_order": False, "lr_bits": 4}),
    ("caldera", {"iters": 2}), ("caldera", {"iters": 2, "lr_bits": 16, "scheme": "channel"}),
])
def test_storage_is_the_stored_tensors_and_the_formula(method, opts):
    opts = {"scheme": "group", "group_size": 32, **opts}
    f = compress_matrix(weight(), method, rank=6, bits=3, inputs=X, **opts)
    assert f.storage_bits == stored_bits(f) == REGISTRY[method].storage_bits(N, D, 6, 3, **opts)
    lr = opts.get("lr_bits", 4 if method == "caldera" else 16)
    lowrank = tensor_bits((N, 6), lr, opts["scheme"], 32) + tensor_bits((6, D), lr, opts["scheme"], 32)
    assert f.stored["L"].storage_bits + f.stored["R"].storage_bits == lowrank
    assert f.stored["Q"].storage_bits == quantize(weight(), 3, opts["scheme"], 32).storage_bits


@pytest.mark.parametrize("method", ["gptq", "lqer", "caldera"])
def test_deterministic_and_module_computes_q_plus_lowrank(method):
    W, bias = weight(), torch.randn(N)
    opts = dict(rank=6, bits=3, inputs=X, scheme="group", group_size=32, quantizer="gptq") if method == "lqer" else \
        dict(rank=6, bits=3, inputs=X, scheme="group", group_size=32)
    if method == "caldera":
        opts["iters"] = 2
    f, g = compress_matrix(W, method, **opts), compress_matrix(W, method, **opts)
    assert isinstance(f, QuantLowRank) and f.storage_bits == g.storage_bits
    for k in f.stored:
        assert torch.equal(f.stored[k].value, g.stored[k].value)
    assert "perm" in f.stored  # act_order with groups keeps Q in the permuted order
    module = f.as_module(bias)
    assert isinstance(module, QuantLowRankLinear)
    x = torch.randn(3, 5, D)
    Q = f.stored["Q"].value[:, torch.argsort(f.stored["perm"].codes.long())]
    want = x @ Q.T + bias
    if method != "gptq":
        want = want + (x @ f.stored["R"].value.T) @ f.stored["L"].value.T
    torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(x), x @ f.reconstruct().T + bias, rtol=1e-4, atol=1e-4)
    for key, p in f.trainable(module).items():  # what healing trains equals what is stored
        assert torch.equal(p.detach(), f.stored[key].value)
    assert set(f.trainable(module)) == ({"Q"} if method == "gptq" else {"Q", "L", "R"})


@pytest.mark.parametrize("method, opts, key", [
    ("lqer", {"lr_bits": 1}, "method.lr_bits"), ("caldera", {"lr_bits": 17}, "method.lr_bits"),
    ("lqer", {"quantizer": "awq"}, "method.quantizer"), ("lqer", {"metric": "l2"}, "method.metric"),
    ("gptq", {"scheme": "nf4"}, "method.scheme"), ("gptq", {"damp": -1}, "method.damp"),
    ("caldera", {"iters": 0}, "method.iters"), ("gptq", {"observer": "minmax"}, "method.observer"),
    ("lqer", {"grid": "wide"}, "method.grid"), ("gptq", {"scale_error": "input"}, "method.scale_error"),
])
def test_bad_options_are_config_errors(method, opts, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compress_matrix(weight(), method, rank=4, bits=3, inputs=X, **opts)


def test_budget_below_q_bits_names_it_and_budget_picks_the_rank():
    with pytest.raises(ConfigError, match=r"below the 3\.\d+ bits/weight of its rank-0 part \(Q at 3 bits\)"):
        compress_matrix(weight(), "lqer", budget=3.0, bits=3, inputs=X, scheme="group", group_size=32)
    f = compress_matrix(weight(), "caldera", budget=4.0, bits=2, inputs=X, scheme="group", group_size=32, iters=1)
    spec = REGISTRY["caldera"]
    assert f.storage_bits <= 4.0 * N * D < spec.storage_bits(N, D, f.rank + 1, 2, scheme="group", group_size=32)


# ---- save / load, sweeps ----------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    ["method=gptq", "bits=4"],                                                        # Q + permutation
    ["method=lqer", "bits=3", "method.lr_bits=8", "method.scheme=channel"],           # Q + L R
    ["method=caldera", "bits=2", "method.iters=2", "method.lr_iters=1", "method.scheme=uniform"],
])
def test_save_load_round_trip(minilm, compose, tmp_path, overrides):
    base, tok = minilm
    model = copy.deepcopy(base)
    cfg = compose([*FAST, r"model.targets='encoder\.layer\.0\.attention\..*'", "rank=8", "save_compressed=true",
                   "calib.n_samples=8", *overrides])
    layers = models.target_modules(model, cfg.model.targets)
    g = torch.Generator().manual_seed(0)
    stats = {name: LayerStats.from_inputs(torch.randn(256, m.in_features, generator=g)) for name, m in layers.items()}
    results = compress_model(model, layers, cfg, stats=stats, progress=False)
    path = save_compressed(model, {r.name: r.factorization for r in results}, tmp_path / "m", tok, "encoder")
    loaded, _ = lrsweep.load_compressed(path)
    batch = tok(["a film to remember", "nothing works in this one, sadly"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    for r in results:
        assert isinstance(loaded.get_submodule(r.name), QuantLowRankLinear)


def test_cli_refuses_bad_lr_bits_and_a_budget_below_q(config_error, tmp_path):
    for args, fragments in ((["method=lqer", "method.lr_bits=1"], ["method.lr_bits", "1 is not supported", "2..15"]),
                            (["method=caldera", "bits=4", "budget=3.5"], ["budget", "below the 4.", "Q at 4 bits"])):
        line = config_error(f"results_dir={tmp_path / 'r'}", *TINY, *args)  # the line the CLI prints (exit 2)
        assert line.startswith(f"lrsweep: config error: {fragments[0]}"), line
        assert all(f in line for f in fragments), line


def test_heal_distill_trains_q_and_the_factors_on_their_grids(minilm, compose):
    from test_heal import DATA, ctx_for

    from lrsweep import heal
    from lrsweep.quant import requantize

    base, tok = minilm
    cfg = compose([*FAST, r"model.targets='encoder\.layer\.0\.attention\..*'", *DATA, "method=lqer", "bits=3",
                   "rank=8", "method.lr_bits=4", "heal=distill", "heal.steps=6", "heal.lr=1e-3"])
    model = copy.deepcopy(base)
    before = heal.snapshot(model)
    layers = models.target_modules(model, cfg.model.targets)
    g = torch.Generator().manual_seed(0)
    stats = {name: LayerStats.from_inputs(torch.randn(256, m.in_features, generator=g)) for name, m in layers.items()}
    results = compress_model(model, layers, cfg, stats=stats, progress=False)
    originals = heal.replaced(before, model)
    bits = {r.name: r.storage_bits for r in results}
    info = heal.apply(model, originals, results, ctx_for(cfg, tok))
    assert info["trained_params"] == sum(q.value.numel() for r in results for q in r.factorization.stored.values())
    for r in results:
        f, module = r.factorization, model.get_submodule(r.name)
        assert f.storage_bits == bits[r.name]
        for key, p in f.trainable(module).items():
            q = f.stored[key]
            assert torch.equal(requantize(q, q.value).value, q.value) and torch.equal(p.detach(), q.value)
