"""param_ratio: the fraction of each layer's parameters kept (the knob of SVD-LLM / ASVD tables)."""

from __future__ import annotations

import pytest
import torch

from lrsweep import methods
from lrsweep.compress import compress_matrix, resolve_rank
from lrsweep.errors import ConfigError
from lrsweep.identity import run_id, run_name
from lrsweep.validate import targets, validate

# SVD-LLM's rank for an m x n weight at "compression ratio" 1 - p: int(m * n * p / (m + n)), written out
# for SmolLM2-135M's layer shapes (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536)
SVDLLM_RANKS = {
    0.8: {(576, 576): 230, (192, 576): 115, (1536, 576): 335, (576, 1536): 335},
    0.6: {(576, 576): 172, (192, 576): 86, (1536, 576): 251, (576, 1536): 251},
    0.4: {(576, 576): 115, (192, 576): 57, (1536, 576): 167, (576, 1536): 167},
}


@pytest.mark.parametrize("ratio", sorted(SVDLLM_RANKS))
def test_reproduces_svdllm_ranks_on_smollm2(compose, tmp_path, ratio):
    cfg = compose(["model=smollm2", "method=svdllm", f"param_ratio={ratio}", f"results_dir={tmp_path}"])
    validate(cfg, check_device=False)
    spec = methods.REGISTRY["svdllm"]
    layers = targets(cfg)
    assert len(layers) == 30 * 7
    for name, t in layers.items():
        r = resolve_rank(spec, *t.shape, cfg.rank, cfg.bits, None, {}, ratio)
        assert r == SVDLLM_RANKS[ratio][t.shape], name
        assert r == int(t.shape[0] * t.shape[1] * ratio / sum(t.shape))  # the formula in SVD-LLM's code


@pytest.mark.parametrize("method,opts", [("kronecker", {}), ("losparse", {"density": 0.02}), ("svd", {})])
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.9])
def test_largest_rank_whose_parameters_fit(method, opts, ratio):
    n, d = 96, 64
    spec = methods.REGISTRY[method]
    r = methods.rank_for_param_ratio(spec, n, d, ratio, **opts)
    assert r >= 1
    assert spec.params(n, d, r, **opts) <= ratio * n * d
    assert r == spec.rank_limit(n, d, **opts) or spec.params(n, d, r + 1, **opts) > ratio * n * d


@pytest.mark.parametrize("method,opts", [("svd", {}), ("lplr", {"b1": 8, "b2": 8}), ("kronecker", {}),
                                         ("losparse", {"density": 0.02})])
def test_stored_parameters_match_the_count(method, opts):
    W = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    f = compress_matrix(W, method, param_ratio=0.5, bits=8, **opts)
    spec = methods.REGISTRY[method]
    assert f.params == spec.params(64, 48, f.rank, **opts) <= 0.5 * 64 * 48
    assert f.rank == methods.rank_for_param_ratio(spec, 64, 48, 0.5, **opts)


def test_full_ratio_keeps_svd_below_break_even():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    f = compress_matrix(W, "svd", param_ratio=1.0)
    assert f.rank == int(40 * 30 / 70) and f.params <= 40 * 30


def test_methods_without_a_rank_ignore_it():
    W = torch.randn(16, 16)
    assert compress_matrix(W, "quant", param_ratio=0.5, bits=4).params == 256


@pytest.mark.parametrize("value,fragment", [(0, "0 < param_ratio <= 1"), (-0.5, "0 < param_ratio <= 1"),
                                            (1.5, "0 < param_ratio <= 1"), ("abc", "0 < param_ratio <= 1"),
                                            (True, "0 < param_ratio <= 1")])
def test_bad_values_are_config_errors(compose, tmp_path, value, fragment):
    cfg = compose([f"param_ratio={value}", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=fragment) as e:
        validate(cfg, check_device=False)
    assert e.value.key == "param_ratio"


def test_with_budget_is_a_config_error(compose, tmp_path):
    with pytest.raises(ConfigError, match="set one of them") as e:
        validate(compose(["param_ratio=0.8", "budget=4", f"results_dir={tmp_path}"]), check_device=False)
    assert e.value.key == "param_ratio"


def test_rank_zero_names_the_layer(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"leaves a 384x384 layer at rank 0 .*\(layer encoder\.layer\.0\.") as e:
        validate(compose(["param_ratio=0.001", f"results_dir={tmp_path}"]), check_device=False)
    assert e.value.key == "param_ratio"


def test_a_method_storing_every_weight_refuses_it():
    spec = methods.MethodSpec("qlr", methods.REGISTRY["svd"].fn, params=None)
    with pytest.raises(ConfigError, match="does not apply to method qlr"):
        resolve_rank(spec, 64, 64, None, 16, None, {}, 0.5)


def test_identity(compose):
    base = compose()
    # its default is the run without it (rekey: schema-1 rows)
    assert run_id(compose(["param_ratio=null"])) == run_id(base)
    ids = {run_id(compose([f"param_ratio={p}"])) for p in (0.8, 0.6)}
    assert run_id(base) not in ids and len(ids) == 2
    assert run_name(compose(["param_ratio=0.8"])).startswith("minilm-svd-p0.8-b16-")


def test_row_records_the_ratio_and_the_measured_one(compose, tmp_path):
    from conftest import FAST
    from lrsweep.job import run

    cfg = compose([*FAST, "param_ratio=0.5", r"model.targets=encoder\.layer\.0\..*", f"results_dir={tmp_path}",
                   "eval.latency.repeats=1", "eval.latency.shapes=[]"])
    row = run(cfg)
    assert row.status == "ok", row.error
    assert row.param_ratio == 0.5 and row.rank is None
    ranks = row.extra["layer_ranks"]
    assert ranks["encoder.layer.0.attention.self.query"] == int(384 * 384 * 0.5 / 768) == 96
    assert ranks["encoder.layer.0.intermediate.dense"] == int(1536 * 384 * 0.5 / 1920) == 153
    shapes = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "attention.output.dense": (384, 384),
              "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}
    kept = dense = 0
    for name, r in ranks.items():
        n, d = next(s for k, s in shapes.items() if name.endswith(k))
        kept, dense = kept + r * (n + d), dense + n * d
    assert row.param_ratio_measured == pytest.approx(kept / dense) and row.param_ratio_measured <= 0.5


@pytest.mark.parametrize("method", ["lqer", "caldera"])
def test_quantized_plus_low_rank_methods_refuse_it(compose, tmp_path, method):
    """Q + L R stores every weight of Q: a fraction of parameters kept has no meaning (use budget)."""
    with pytest.raises(ConfigError, match=f"does not apply to method {method}") as e:
        validate(compose([f"method={method}", "param_ratio=0.8", f"results_dir={tmp_path}"]), check_device=False)
    assert e.value.key == "param_ratio"
