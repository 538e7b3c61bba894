"""Typed method options (one dataclass per method, the one place of each default) and the model-level
API ``lrsweep.compress_`` that needs no Hydra config."""

from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import CONF, REPO
from lrsweep import compress_, compress_matrix
from lrsweep.compress import compress_model
from lrsweep.errors import ConfigError
from lrsweep.methods import REGISTRY, LayerStats, QuantizerOptions, register
from lrsweep.methods.gptq import GPTQOptions
from lrsweep.methods.kronecker import KroneckerOptions
from lrsweep.methods.svd import SVDOptions
from lrsweep.methods.svdllm import SVDLLMOptions

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if p.stem != "custom")

# cfg.method as composed before options were typed (the yamls then listed every default), with the
# `_target_` built-ins carried until they were known by name alone: run ids hash it
BEFORE = {
    "svd": {"name": "svd", "_target_": "lrsweep.methods.svd.svd", "scheme": "uniform", "group_size": 128,
            "driver": "auto"},
    "lplr": {"name": "lplr", "_target_": "lrsweep.methods.lplr.lplr", "b1": None, "b2": None, "cr": None,
             "b_nq": None, "scheme": "uniform", "group_size": 128},
    "kronecker": {"name": "kronecker", "_target_": "lrsweep.methods.kronecker.kronecker", "a_shape": None,
                  "scheme": "uniform", "group_size": 128, "driver": "auto"},
    "asvd": {"name": "asvd", "_target_": "lrsweep.methods.asvd.asvd", "alpha": 0.5, "eps": 1e-06, "solver": "exact",
             "scheme": "uniform", "group_size": 128, "driver": "auto"},
    "lqer": {"name": "lqer", "_target_": "lrsweep.methods.lqer.lqer", "quantizer": "rtn", "metric": "qera",
             "lr_bits": 16, "scheme": "group", "group_size": 128, "damp": 0.01, "act_order": True, "shift": 1e-06},
    "caldera": {"name": "caldera", "_target_": "lrsweep.methods.caldera.caldera", "lr_bits": 4, "iters": 15,
                "lr_iters": 5, "scheme": "group", "group_size": 128, "damp": 0.01, "act_order": True, "shift": 1e-06},
}


@pytest.mark.parametrize("method", sorted(BEFORE))
def test_composed_method_config_is_what_it_was(compose, method):
    from lrsweep.identity import experiment_config

    cfg = compose([f"method={method}"])
    grid = {"grid": "auto", "observer": "absmax"}  # the quantizer's options added since, at their defaults
    if "damp" in BEFORE[method]:  # gptq's options (lqer, caldera): its grid best and scale search
        grid = {**grid, "scale_error": "output", "grid": "best"}
    assert OmegaConf.to_container(cfg.method) == {**{k: v for k, v in BEFORE[method].items() if k != "_target_"},
                                                  **grid}
    assert experiment_config(cfg)["method"] == OmegaConf.to_container(cfg.method)  # hashed as composed


@pytest.mark.parametrize("method", METHODS)
def test_a_built_in_is_hashed_as_it_was_with_its_target(compose, method):
    """A built-in is identified by its name: its config with a `_target_` naming its own function (as
    rows written before record it) is the same run."""
    from lrsweep.identity import run_id

    for extra in ([], ["bits=4", "method.scheme=channel"]):
        cfg = compose([f"method={method}", *extra])
        before = OmegaConf.merge(cfg, {"method": {"_target_": f"lrsweep.methods.{method}.{method}"}})
        assert "_target_" not in cfg.method and run_id(cfg) == run_id(before)


def test_a_target_on_a_built_in_is_that_function_under_its_name(compose, monkeypatch, config_error, tmp_path):
    """method._target_ (with or without +) on a built-in's config plugs in that function with the
    built-in's name and options, as it did when built-ins carried a `_target_`; an option key the method
    does not take is still refused before launch, naming it and the valid ones."""
    from conftest import PLUGINS
    from lrsweep.compress import method_spec

    monkeypatch.syspath_prepend(str(PLUGINS))
    for override in ("method._target_", "+method._target_"):
        cfg = compose(["method=svd", f"{override}=lrsweep_testplugins.fails_above"])
        spec = method_spec(cfg.method)
        assert spec.name == "svd" and spec.fn.__name__ == "fails_above" and spec.option_type is None
    assert method_spec(compose(["method=svd", "method._target_=lrsweep.methods.svd.svd"]).method) is REGISTRY["svd"]
    assert config_error("method=svd", "method.alpha=0.5", f"results_dir={tmp_path}", "logger=none") == \
        ("lrsweep: config error: method.alpha: is not an option of method svd "
         "(valid: driver, grid, group_size, observer, scheme)")


@pytest.mark.parametrize("method", METHODS)
def test_every_default_lives_in_the_dataclass(compose, method):
    """The yaml names its base config (and calibration) only; the composed config is the dataclass's."""
    yaml = OmegaConf.load(CONF / "method" / f"{method}.yaml")
    assert set(yaml) == {"defaults"} and f"base/{method}@_here_" in yaml.defaults
    spec = REGISTRY[method]
    composed = OmegaConf.to_container(compose([f"method={method}"]).method)
    assert composed == {"name": method, **dataclasses.asdict(spec.option_type())}  # a built-in: no _target_
    assert spec.options() == set(composed) - {"name"}
    assert issubclass(spec.option_type, QuantizerOptions)


def test_quantizer_defaults_in_one_place():
    gptq_family = {m for m, s in REGISTRY.items() if issubclass(s.option_type, GPTQOptions)}
    assert gptq_family == {"gptq", "lqer", "caldera"}
    for name, spec in REGISTRY.items():
        o = spec.option_type()
        assert (o.scheme, o.group_size) == (("group" if name in gptq_family else "uniform"), 128), name


def test_parse_checks_keys_and_types():
    spec = REGISTRY["kronecker"]
    assert spec.parse({"a_shape": [8, 4], "scheme": "group"}) == KroneckerOptions(a_shape=[8, 4], scheme="group")
    with pytest.raises(ConfigError, match=r"^method.alpha: is not an option of method kronecker "
                                          r"\(valid: a_shape, driver, grid, group_size, observer, scheme\)$"):
        spec.parse({"alpha": 0.5})
    with pytest.raises(ConfigError, match=r"^method.a_shape: \[8, 'x'\] is not a list of integers or null$"):
        spec.parse({"a_shape": [8, "x"]})
    with pytest.raises(ConfigError, match=re.escape("method.group_size: True is not an integer")):
        spec.parse({"group_size": True})
    assert REGISTRY["svdllm"].parse({"shift": 1}) == SVDLLMOptions(shift=1)  # an integer is a number
    with pytest.raises(ConfigError, match=re.escape("method.act_order: 'yes' is not true/false")):
        REGISTRY["gptq"].parse({"act_order": "yes"})


@pytest.mark.parametrize("overrides, key", [
    (["method=svd", "method.group_size=abc"], "method.group_size"),
    (["method=lplr", "method.cr=high"], "method.cr"),
    (["method=svd", "+method.alpha=0.5"], "method.alpha"),
])
def test_bad_option_types_fail_validation(compose, tmp_path, overrides, key):
    from lrsweep.validate import validate

    with pytest.raises(ConfigError) as e:
        validate(compose([*overrides, f"results_dir={tmp_path}", "logger=none"]), check_device=False)
    assert e.value.key == key, str(e.value)


def test_options_dataclass_and_keywords_are_one_method():
    W = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    a = compress_matrix(W, SVDOptions(scheme="group", group_size=16), rank=4, bits=4)
    b = compress_matrix(W, "svd", rank=4, bits=4, scheme="group", group_size=16)
    c = compress_matrix(W, SVDOptions(scheme="channel"), rank=4, bits=4, scheme="group", group_size=16)  # keywords win
    assert torch.equal(a.reconstruct(), b.reconstruct()) and torch.equal(a.reconstruct(), c.reconstruct())
    assert a.stored["L"].scheme == "group"
    with pytest.raises(ConfigError, match="method: QuantizerOptions is not the options dataclass"):
        compress_matrix(W, QuantizerOptions(), rank=4)


def test_a_method_registered_without_a_dataclass(monkeypatch):
    """A plain function registered by name keeps the keyword contract; its options come from its signature."""
    monkeypatch.setattr("lrsweep.methods.REGISTRY", dict(REGISTRY))
    from lrsweep.factorization import LowRank
    from lrsweep.quant import quantize

    @register("plain_test")
    def plain(W, *, rank, bits=16, seed=0, stats=None, shrink: float = 1.0):
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        return LowRank.of(quantize(U[:, :rank] * S[:rank] * shrink, bits), quantize(Vh[:rank], bits))

    from lrsweep import methods

    spec = methods.REGISTRY["plain_test"]
    assert spec.option_type is None and spec.options() == {"shrink"}
    W = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    f = compress_matrix(W, "plain_test", rank=24, bits=32, shrink=1.0)
    assert f.rel_error(W) < 1e-5 and f.storage_bits == spec.storage_bits(40, 24, 24, 32) == 32 * 24 * 64
    with pytest.raises(ConfigError, match=r"method.alpha: is not an option of method plain_test \(valid: shrink\)"):
        compress_matrix(W, "plain_test", rank=4, alpha=1.0)


def test_a_typed_method_registered_outside_the_package_keeps_its_target(monkeypatch, compose):
    """Its config names its function (``_target_`` imports it where the config is read); the identity
    hashes it as it is."""
    from lrsweep import methods
    from lrsweep.identity import experiment_config

    monkeypatch.setattr(methods, "REGISTRY", dict(REGISTRY))  # restored (typed_test removed) after the test
    monkeypatch.setattr(methods, "BY_OPTIONS", dict(methods.BY_OPTIONS))

    @dataclasses.dataclass
    class TypedOptions(QuantizerOptions):
        shrink: float = 1.0

    @register("typed_test", TypedOptions)
    def typed(W, o, *, rank, bits, seed, stats=None):
        return REGISTRY["svd"].fn(W, rank=rank, bits=bits, seed=seed, scheme=o.scheme, group_size=o.group_size)

    spec = methods.REGISTRY["typed_test"]
    assert not spec.builtin and all(s.builtin for s in REGISTRY.values())
    node = {"name": "typed_test", "_target_": spec.target, "scheme": "uniform", "group_size": 128, "grid": "auto",
            "observer": "absmax", "shrink": 1.0}
    assert OmegaConf.to_container(methods.config_node("typed_test")) == node
    cfg = compose(["method=base/typed_test"])  # Hydra's method/base/typed_test (hydra_plugins/lrsweep_methods)
    assert OmegaConf.to_container(cfg.method) == node and experiment_config(cfg)["method"] == node


# ---- compress_: a model's layers in place, no Hydra ---------------------------------------------------


def tiny(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 8)).to(dtype)


def test_compress_replaces_linears_in_place():
    model, x = tiny(), torch.randn(5, 32)
    dense = copy.deepcopy(model)
    results = compress_(model, SVDOptions(), rank=8, bits=32)
    assert [r.name for r in results] == ["0", "2", "4"] and [r.rank for r in results] == [8, 8, 8]
    assert [r.rank for r in compress_(tiny(), "svd", ranks={"0": 12, "2": 6, "4": 3})] == [12, 6, 3]
    assert type(model[0]).__name__ == "LowRankLinear" and results[0].factorization is None
    with torch.no_grad():
        assert torch.allclose(model[4](torch.eye(16)), dense[4](torch.eye(16)), atol=1e-5)  # 8 = full rank
        assert model(x).shape == (5, 8)
    exact = compress_(tiny(), "svd", ["2"], rank=16, bits=32, keep=True)  # names; rank 16 = full: exact
    assert len(exact) == 1 and exact[0].rel_err < 1e-5 and exact[0].factorization.rank == 16


def test_offload_moves_each_replaced_layer_and_only_it():
    """``offload``: every replaced original leaves for that device (``meta`` stands in for the CPU a
    GPU job offloads to); the compressed model stays where it was and computes the same."""
    model, x = tiny(), torch.randn(5, 32)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kept = tiny()
    compress_(kept, "svd", ["0", "4"], rank=6)
    results = compress_(model, "svd", ["0", "4"], rank=6, offload="meta")
    assert [r.name for r in results] == ["0", "4"]
    assert all(p.is_meta for n in ("0", "4") for p in originals[n].parameters())
    assert not any(p.is_meta for p in originals["2"].parameters()) and model[2] is originals["2"]
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), kept(x))


def test_compress_targets_budget_and_stats():
    model = tiny()
    X = torch.randn(256, 32, generator=torch.Generator().manual_seed(2))
    stats = {"0": LayerStats.from_inputs(X)}
    results = compress_(model, SVDLLMOptions(shift=1e-5), r"0", rank=4, bits=8, stats=stats)
    assert [r.name for r in results] == ["0"] and type(model[2]) is nn.Linear
    with pytest.raises(ValueError, match="needs the calibration statistic 'xtx'"):
        compress_(tiny(), "svdllm", "2", rank=4)
    budgeted = compress_(tiny(), "svd", budget=4.0, bits=8, scheme="channel")
    assert all(r.storage_bits <= 4.0 * r.shape[0] * r.shape[1] for r in budgeted)
    with pytest.raises(ConfigError, match=re.escape("method.alpha")):
        compress_(tiny(), "svd", rank=4, alpha=1.0)


def test_compress_model_is_compress_with_the_config():
    cfg = OmegaConf.create({"method": {"name": "lplr", "b1": 8, "b2": None, "cr": None, "b_nq": None,
                                       "scheme": "uniform", "group_size": 128},
                            "rank": 4, "bits": 4, "budget": None, "seed": 3})
    # a config recorded before built-ins lost their _target_ (a row's) names the same method
    old = OmegaConf.merge(cfg, {"method": {"_target_": "lrsweep.methods.lplr.lplr"}})
    a, b, c = tiny(), tiny(), tiny()
    ra = compress_model(a, {n: m for n, m in a.named_modules() if isinstance(m, nn.Linear)}, cfg, progress=False)
    rb = compress_(b, "lplr", rank=4, bits=4, seed=3, b1=8)
    rc = compress_model(c, {n: m for n, m in c.named_modules() if isinstance(m, nn.Linear)}, old, progress=False)
    key = [(r.name, r.rank, r.storage_bits, r.rel_err) for r in ra]
    assert key == [(r.name, r.rank, r.storage_bits, r.rel_err) for r in rb]
    assert key == [(r.name, r.rank, r.storage_bits, r.rel_err) for r in rc]
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["svd", "lplr", "quant", "kronecker", "losparse"])
def test_half_precision_model_keeps_its_dtype(method, dtype):
    model = tiny(dtype)
    results = compress_(model, method, rank=4, bits=8, keep=True)
    f = results[0].factorization
    assert f.dtype == dtype and f.reconstruct().dtype == dtype
    x = torch.randn(3, 32, dtype=dtype)
    with torch.no_grad():
        y = model(x)
        y_own = f.as_module()(x)  # no dtype given: the module takes W's dtype, so a bf16 input works
    assert y.dtype == dtype and torch.isfinite(y).all() and y_own.dtype == dtype


def test_import_is_light():
    code = "import sys, lrsweep; assert not {'torch', 'hydra', 'omegaconf'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
