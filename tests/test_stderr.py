"""Standard errors of the evaluation metrics (lrsweep.stderr) against known values, and the seed
checks: a randomized method run with one seed is named in one plan line; a list seed is refused."""

from __future__ import annotations

import math
import statistics
from typing import ClassVar

import pytest
import torch

from lrsweep import seeds, stderr
from lrsweep.evaluate import ppl


@pytest.mark.parametrize("p,n", [(0.5, 100), (0.9, 500), (0.738, 500), (0.0, 10), (1.0, 7)])
def test_binomial_stderr_is_sqrt_p_1mp_over_n(p, n):
    assert stderr.binomial(p, n) == pytest.approx(math.sqrt(p * (1 - p) / n), abs=1e-15)


def test_binomial_known_values_and_missing():
    assert stderr.binomial(0.5, 100) == pytest.approx(0.05)
    assert stderr.binomial(0.9, 400) == pytest.approx(0.015)
    assert stderr.binomial(None, 100) is None and stderr.binomial(0.5, 0) is None
    assert stderr.binomial(float("nan"), 10) is None


def test_item_mean_is_the_sample_std_over_sqrt_n():
    scores = [1.0, 0.5, 0.0, 0.0]
    mean, se = stderr.item_mean(scores)
    assert mean == pytest.approx(0.375)
    assert se == pytest.approx(statistics.stdev(scores) / 2)  # sqrt(0.22917) / 2 = 0.2394
    assert se == pytest.approx(math.sqrt((0.625**2 + 0.125**2 + 2 * 0.375**2) / 3 / 4))
    assert stderr.item_mean([0.3]) == (0.3, None) and stderr.item_mean([1.0] * 5)[1] == 0.0


def test_window_mean_equal_windows_is_std_over_sqrt_k():
    losses = [2.0, 2.5, 3.0, 3.5]
    mean, se = stderr.window_mean(losses, [512] * 4)
    assert mean == pytest.approx(2.75)
    assert se == pytest.approx(statistics.stdev(losses) / math.sqrt(4))  # sqrt(5/12)/2 = 0.3227
    assert se == pytest.approx(math.sqrt(5 / 12) / 2)


def test_window_mean_weighted_ratio_estimator():
    """A short last window weighs by its tokens: the mean is the token mean, the error the ratio
    estimator's k/(k-1) * sum(w^2 (l - mean)^2) / W^2."""
    losses, w = [1.0, 3.0, 2.0], [100, 100, 50]
    mean, se = stderr.window_mean(losses, w)
    assert mean == pytest.approx((100 + 300 + 100) / 250)
    expected = math.sqrt(3 / 2 * (100**2 * 1.0**2 + 100**2 * 1.0**2 + 50**2 * 0.0) / 250**2)
    assert se == pytest.approx(expected)
    # identical windows: no spread, no error; one window: nothing to estimate it from
    assert stderr.window_mean([2.0, 2.0, 2.0], [10, 10, 10])[1] == 0.0
    assert stderr.window_mean([2.0], [10]) == (2.0, None)
    with pytest.raises(ValueError):
        stderr.window_mean([1.0, 2.0], [1])


def test_perplexity_stderr_delta_method_on_constructed_losses():
    losses = [math.log(20), math.log(30), math.log(25), math.log(40)]
    value, se = stderr.perplexity(losses, [256] * 4)
    mean = sum(losses) / 4
    assert value == pytest.approx(math.exp(mean))
    assert se == pytest.approx(math.exp(mean) * statistics.stdev(losses) / 2)
    assert stderr.perplexity([1e4, 1.0], [1, 1])[0] == math.inf and stderr.perplexity([1e4, 1.0], [1, 1])[1] is None


@torch.no_grad()
def test_perplexity_stderr_from_the_models_windows():
    """ppl.perplexity_stderr is stderr.perplexity of each window's own loss (computed here per window)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32)).eval()
    ids = torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(3))
    losses, counts = [], []
    for begin in range(0, 40, 16):  # windows [0,16) [16,32) [32,40), each scoring all but its first token
        window = ids[:, begin:begin + 16]
        losses.append(float(model(window, labels=window).loss))
        counts.append(window.shape[1] - 1)
    got_losses, got_counts = ppl.window_losses(model, ids, 16, 16, "cpu")
    assert got_counts == counts and got_losses == pytest.approx(losses, rel=1e-6)
    value, se = ppl.perplexity_stderr(model, ids, 16, 16, "cpu")
    assert (value, se) == pytest.approx(stderr.perplexity(losses, counts), rel=1e-6)
    assert se > 0 and value == pytest.approx(ppl.perplexity(model, ids, 16, 16, "cpu"))


# ---- seeds -----------------------------------------------------------------------------------------

def test_randomized_methods_are_declared():
    from lrsweep import methods

    assert methods.REGISTRY["lplr"].is_randomized() and methods.REGISTRY["rsvd"].is_randomized()
    assert not methods.REGISTRY["svd"].is_randomized() and not methods.REGISTRY["quant"].is_randomized()
    assert not methods.REGISTRY["asvd"].is_randomized(solver="exact")
    assert methods.REGISTRY["asvd"].is_randomized(solver="lowrank")


def test_one_seed_note_names_randomized_methods_in_one_line(compose):
    grid = [compose([f"method={m}", f"rank={r}", f"seed={s}"]) for m in ("svd", "lplr", "rsvd")
            for r in (32, 64) for s in ((0, 1, 2) if m == "rsvd" else (5,))]
    note = seeds.single_seed_note(grid)
    assert note is not None and "\n" not in note
    assert "lplr" in note and "rsvd" not in note and "svd," not in note and "seed=5,6,7" in note
    assert seeds.single_seed_note([compose(["method=svd"])]) is None  # deterministic: nothing to say
    assert seeds.single_seed_note([compose(["method=lplr", f"seed={s}"]) for s in (0, 1)]) is None
    assert "asvd" in seeds.single_seed_note([compose(["method=asvd", "method.solver=lowrank"])])


def test_sweep_plan_logs_the_one_seed_line(compose, monkeypatch, caplog, tmp_path):
    """sweep.plan says it, once, for a grid giving lplr one seed (composition stubbed, validation real)."""
    from lrsweep import sweep
    from lrsweep.identity import resolved
    from lrsweep.sweep import planning
    from lrsweep.sweep.compose import Composed

    cfgs = {("method=lplr", "rank=32"): compose(["method=lplr", "rank=32", "sweep_name=x", f"results_dir={tmp_path}"]),
            ("method=svd", "rank=32"): compose(["method=svd", "rank=32", "sweep_name=x", f"results_dir={tmp_path}"])}
    monkeypatch.setattr(planning, "sweep_points", lambda _l, _c, grid, **_: [
        Composed(resolved(cfgs[tuple(g[:2])]), cfgs[tuple(g[:2])]) for g in grid])

    from omegaconf import OmegaConf

    class Launcher:
        config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "hydra" / "x")}}})
        hydra_context = type("H", (), {"config_loader": None})
        _EXECUTOR = "local"
        params: ClassVar[dict] = {}

    with caplog.at_level("WARNING", logger="lrsweep.sweep"):
        sweep.plan(Launcher, [list(k) for k in cfgs], 0)
    lines = [r.getMessage() for r in caplog.records if "one seed" in r.getMessage()]
    assert len(lines) == 1 and "lplr" in lines[0] and "seed=0,1,2" in lines[0]


def test_a_sweep_gives_randomized_methods_more_seeds(compose):
    """seeds.more: ``seeds`` - 1 more seeds for a randomized method's point, none for a deterministic
    one, one whose grid sets ``seed``, or ``seeds=1``."""
    from lrsweep.identity import resolved

    def more(*overrides, grid=()):
        return seeds.more(resolved(compose(list(overrides))), list(grid))

    assert more("method=lplr") == [1, 2] and more("method=rsvd", "seed=5") == [6, 7]
    assert more("method=svd") == [] and more("method=asvd") == []
    assert more("method=asvd", "method.solver=lowrank", "seeds=2") == [1]
    assert more("method=lplr", "seeds=1") == [] and more("method=lplr", grid=["seed=0"]) == []


def test_the_plan_adds_each_randomized_point_its_seeds_in_grid_order():
    from lrsweep.sweep.planning import with_seeds

    class Point:
        def __init__(self, method, seed=0):
            self.resolved = {"method": {"name": method}, "seed": seed, "seeds": 3}

    grid = [["method=svd"], ["method=lplr", "rank=8"], ["method=lplr", "seed=4"]]
    made = []
    out, composed = with_seeds(grid, [Point("svd"), Point("lplr"), Point("lplr", 4)],
                               lambda g: made.extend(g) or [f"made {' '.join(o)}" for o in g])
    assert out == [["method=svd"], ["method=lplr", "rank=8"], ["method=lplr", "rank=8", "seed=1"],
                   ["method=lplr", "rank=8", "seed=2"], ["method=lplr", "seed=4"]]
    assert composed[2:4] == ["made method=lplr rank=8 seed=1", "made method=lplr rank=8 seed=2"]
    assert made == out[2:4]  # composed once, together


def test_seeds_must_be_a_positive_integer(config_error):
    line = config_error("seeds=0")
    assert line is not None and line.startswith("lrsweep: config error: seeds: 0 is not a positive integer")


def test_seed_list_for_one_run_is_a_config_error(config_error):
    line = config_error("seed=[0,1]")
    assert line is not None and "\n" not in line
    assert line.startswith("lrsweep: config error: seed:") and "-m seed=0,1" in line
    assert "not an integer" in config_error("seed=abc")
    assert config_error("seed=3") is None


def test_seed_list_cli_exits_2_with_one_line(tmp_path):
    from conftest import run_cli

    proc = run_cli("seed=[0,1]", f"results_dir={tmp_path}", "logger=none")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("lrsweep: config error: seed:") and "python -m lrsweep -m seed=0,1" in lines[0]
    assert not (tmp_path / "rows").exists()
