"""allocation=uniform|spectrum|sensitivity: ranks across layers under one global budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lrsweep import allocate, methods
from lrsweep.allocate import Choice, knapsack
from lrsweep.errors import ConfigError
from lrsweep.identity import run_id, run_name
from lrsweep.methods import LayerStats
from lrsweep.validate import validate


def brute_force(choices: list[Choice], cap: int) -> float:
    best = -np.inf
    for ks in itertools.product(*(range(len(c.cost)) for c in choices)):
        if sum(int(c.cost[k]) for c, k in zip(choices, ks, strict=True)) <= cap:
            best = max(best, sum(float(c.gain[:k].sum()) for c, k in zip(choices, ks, strict=True)))
    return best


def value(choices: list[Choice], ranks: list[int]) -> tuple[float, int]:
    return (sum(float(c.gain[:r - c.lo].sum()) for c, r in zip(choices, ranks, strict=True)),
            sum(int(c.cost[r - c.lo]) for c, r in zip(choices, ranks, strict=True)))


def random_choices(seed: int, layers: int = 3, equal_step: bool = False) -> list[Choice]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        lo, k = int(rng.integers(1, 3)), int(rng.integers(2, 6))
        sigma2 = np.sort(rng.exponential(size=k))[::-1]  # a hand-made spectrum: decreasing
        step = 5 if equal_step else int(rng.integers(2, 9))
        out.append(Choice(lo, np.array([step * (lo + j) + (3 if j else 0) * (not equal_step) for j in range(k + 1)]),
                          sigma2 / sigma2.sum()))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_exact_knapsack_is_optimal_and_within_budget(seed):
    choices = random_choices(seed)
    low = sum(int(c.cost[0]) for c in choices)
    high = sum(int(c.cost[-1]) for c in choices)
    for cap in (low, (low + high) // 2, high - 1, high + 7):
        ranks, solver = knapsack(choices, cap)
        got, spent = value(choices, ranks)
        assert solver == "exact"
        assert spent <= cap
        assert all(c.lo <= r <= c.hi for c, r in zip(choices, ranks, strict=True))
        assert got == pytest.approx(brute_force(choices, cap))


@pytest.mark.parametrize("seed", range(12))
def test_greedy_knapsack_within_budget_and_one_step_of_optimal(monkeypatch, seed):
    monkeypatch.setattr(allocate.solve, "EXACT_CELLS", 0)
    choices = random_choices(seed)
    low, high = sum(int(c.cost[0]) for c in choices), sum(int(c.cost[-1]) for c in choices)
    cap = (low + high) // 2
    ranks, solver = knapsack(choices, cap)
    got, spent = value(choices, ranks)
    assert solver == "greedy" and spent <= cap
    assert all(c.lo <= r <= c.hi for c, r in zip(choices, ranks, strict=True))
    assert got >= brute_force(choices, cap) - max(float(c.gain.max()) for c in choices) - 1e-12
    # one cost per step and decreasing gains: greedy is exactly optimal
    equal = random_choices(seed, equal_step=True)
    cap = (sum(int(c.cost[0]) for c in equal) + sum(int(c.cost[-1]) for c in equal)) // 2
    assert value(equal, knapsack(equal, cap)[0])[0] == pytest.approx(brute_force(equal, cap))


def test_knapsack_refuses_an_infeasible_cap():
    with pytest.raises(ValueError, match="lowest ranks cost"):
        knapsack(random_choices(0), 1)


def test_spectrum_of_svdllm_is_its_output_error():
    """Dropping whitened singular value i costs exactly σ_i² of ‖(W - Ŵ) Xᵀ‖², and the truncation is svdllm's."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 16, generator=g), torch.randn(200, 16, generator=g) * torch.linspace(0.1, 3, 16)
    stats = LayerStats.from_inputs(X)
    spec = methods.REGISTRY["svdllm"]
    sp = allocate.spectrum(W, spec, stats, {})
    tail = sp.tail()
    for r in (1, 5, 12):
        err = ((W.double() - sp.approx(r).double()) @ X.double().T).pow(2).sum()
        assert float(err) == pytest.approx(tail[r], rel=1e-3)
        f = spec.fn(W, rank=r, bits=32, stats=stats)
        assert torch.allclose(f.reconstruct().float(), sp.approx(r).float(), atol=1e-3)


@pytest.mark.parametrize("method,opts", [("svd", {}), ("asvd", {}), ("fwsvd", {}), ("fwsvd", {"side": "input"}),
                                         ("fwsvd", {"power": 0.25})])
def test_spectrum_truncation_matches_the_method(method, opts):
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(20, 12, generator=g), torch.randn(100, 12, generator=g).abs() + 0.1
    stats = LayerStats.from_inputs(X)
    stats.fisher = torch.rand(20, 12, generator=g)
    spec = methods.REGISTRY[method]
    sp = allocate.spectrum(W, spec, stats, opts)
    f = spec.fn(W, rank=4, bits=32, stats=stats, **opts)
    assert torch.allclose(f.reconstruct().float(), sp.approx(4).float(), atol=1e-4)


def test_choose_keeps_ranks_in_bounds_and_at_most_uniform_cost(compose, tmp_path):
    cfg = compose(["param_ratio=0.5", "allocation=spectrum", f"results_dir={tmp_path}"])
    spec = methods.REGISTRY["svd"]
    shapes = {"a": (64, 64), "b": (128, 64), "c": (32, 96)}
    uniform = {n: methods.rank_for_param_ratio(spec, *s, 0.5) for n, s in shapes.items()}
    value = {"a": np.full(64, 10.0), "b": np.full(64, 1e-6), "c": np.full(32, 1.0)}  # "a" wants everything
    ranks, info = allocate.choose(spec, shapes, uniform, value, cfg, {})
    cost = sum(spec.params(*shapes[n], r) for n, r in ranks.items())
    assert cost <= info["cap"] == sum(spec.params(*shapes[n], r) for n, r in uniform.items())
    for n, (rows, cols) in shapes.items():
        limit = min(spec.rank_limit(rows, cols), methods.rank_for_param_ratio(spec, rows, cols, 1.0))
        assert max(1, int(allocate.LOW * uniform[n])) <= ranks[n] <= max(uniform[n], min(limit, 2 * uniform[n]))
    assert ranks["a"] > uniform["a"] and ranks["b"] < uniform["b"]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(16, 16, bias=False)
        self.b = nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(16, 16, generator=g))
            self.b.weight.copy_(torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g))  # rank 2

    def forward(self, x):
        return self.b(self.a(x))


def test_falls_back_to_uniform_when_the_candidate_is_worse():
    model = _Toy()
    layers = {"a": model.a, "b": model.b}
    spectra = {n: allocate.spectrum(m.weight, methods.REGISTRY["svd"], None, {}) for n, m in layers.items()}
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    target = model(x).detach()
    batches = [{"x": x}]

    def loss(m, batch):
        return (m(batch["x"]) - target).pow(2).mean()

    uniform = {"a": 8, "b": 8}
    worse = {"a": 2, "b": 14}  # b has rank 2: rank moved there is wasted
    better = {"a": 14, "b": 2}
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    ranks, c = allocate.against_uniform(model, layers, spectra, uniform, worse, batches, loss)
    assert ranks is uniform and c.loss_candidate > c.loss_uniform and c.samples == 1 and c.se == 0
    ranks, c = allocate.against_uniform(model, layers, spectra, uniform, better, batches, loss)
    assert ranks is better and c.loss_candidate < c.loss_uniform
    ranks, _ = allocate.against_uniform(model, layers, spectra, uniform, dict(uniform), batches, loss)
    assert ranks is uniform  # a tie ships uniform
    assert all(torch.equal(before[n], m.weight) for n, m in layers.items())  # weights restored


def test_a_gain_within_the_noise_of_the_held_out_samples_ships_uniform():
    """Per-sample losses: the candidate ships only when lower by more than CHECK_Z (2) standard errors
    of the paired differences (mean d + 2 se < 0), whatever the sign of the mean alone."""
    model = _Toy()
    layers = {"a": model.a, "b": model.b}
    spectra = {n: allocate.spectrum(m.weight, methods.REGISTRY["svd"], None, {}) for n, m in layers.items()}
    uniform, better = {"a": 8, "b": 8}, {"a": 14, "b": 2}
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    target = model(x).detach()
    batches = [{"x": x}]
    with allocate.Swap(layers, {n: spectra[n].approx(r) for n, r in uniform.items()}):
        base = (model(x) - target).pow(2).mean(1)
    with allocate.Swap(layers, {n: spectra[n].approx(r) for n, r in better.items()}):
        gain = base - (model(x) - target).pow(2).mean(1)
    assert (gain > 0).all()  # the candidate is better on every sample: it ships

    def loss(m, batch):
        return (m(batch["x"]) - target).pow(2).mean(1)

    ranks, c = allocate.against_uniform(model, layers, spectra, uniform, better, batches, loss)
    d = -gain.detach().double().numpy()
    assert ranks is better and c.samples == 8
    assert c.se == pytest.approx(d.std(ddof=1) / 8 ** 0.5)
    assert c.loss_candidate - c.loss_uniform == pytest.approx(d.mean())

    noise = torch.tensor([1.0, -1.0] * 4) * 50 * float(gain.detach().abs().max())  # same mean gain, huge spread

    cand_b = spectra["b"].approx(2)

    def noisy(m, batch):  # the candidate's per-sample losses get zero-mean noise: same means, wide spread
        return loss(m, batch) + noise * torch.equal(m.b.weight.detach(), cand_b.to(m.b.weight.dtype))

    ranks, c = allocate.against_uniform(model, layers, spectra, uniform, better, batches, noisy)
    assert c.loss_candidate < c.loss_uniform and c.se > c.loss_uniform - c.loss_candidate
    assert ranks is uniform

    # a gain between one and two standard errors: not enough
    spread = torch.tensor([1.0, -1.0] * 4)
    gap = float(gain.detach().mean())
    scale = gap * 7 ** 0.5 / 1.5  # the spread's own standard error is scale / sqrt(7): the gain is ~1.5 of them

    def between(m, batch):
        return loss(m, batch) + spread * scale * torch.equal(m.b.weight.detach(), cand_b.to(m.b.weight.dtype))

    ranks, c = allocate.against_uniform(model, layers, spectra, uniform, better, batches, between)
    gap_in_se = (c.loss_uniform - c.loss_candidate) / c.se
    assert 1 < gap_in_se < allocate.CHECK_Z and ranks is uniform


def test_uniform_is_unchanged(compose):
    base = compose()
    # its default is the run without it (rekey: schema-1 rows)
    assert run_id(compose(["allocation=uniform"])) == run_id(base)
    assert run_id(compose(["allocation=spectrum", "param_ratio=0.5"])) != run_id(compose(["param_ratio=0.5"]))
    assert "-spectrum-" in run_name(compose(["allocation=spectrum", "param_ratio=0.5"]))
    assert allocate.allocate(None, {}, type("C", (), {"cfg": base})(), None) == (None, {})


@pytest.mark.parametrize("overrides,key,fragment", [
    (["allocation=knapsack", "param_ratio=0.5"], "allocation", "'knapsack' is unknown"),
    (["allocation=spectrum"], "allocation", "one global budget"),
    (["allocation=sensitivity", "param_ratio=0.5"], "calib", "held-out calibration"),
    (["allocation=spectrum", "method=svdllm", "param_ratio=0.5", "calib.sequential=true"], "allocation",
     "calib.sequential"),
    (["allocation=spectrum", "method=svdllm", "param_ratio=0.5", "stream=true"], "allocation", "stream=true"),
    (["allocation=spectrum", "method=quant", "budget=4", "+calib=default"], "allocation", "no free per-layer rank"),
])
def test_bad_configs_exit_before_launch(compose, tmp_path, overrides, key, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        validate(compose([*overrides, f"results_dir={tmp_path}"]), check_device=False)
    assert e.value.key == key
    if fragment.endswith("unknown"):
        assert str(e.value).endswith(f"(valid: {', '.join(allocate.STRATEGIES)})")


def test_budget_below_every_rank_one_cost_names_the_minimum(compose, tmp_path):
    cfg = compose(["allocation=spectrum", "budget=0.01", "+calib=default", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"0.01 is below every layer's rank-1 cost: the minimum is 0\.0[0-9]+") as e:
        validate(cfg, check_device=False)
    assert e.value.key == "budget"


@pytest.mark.slow
def test_a_run_records_the_allocation(compose, tmp_path):
    from conftest import FAST
    from lrsweep.job import run

    cfg = compose([*FAST, "param_ratio=0.5", "allocation=spectrum", "+calib=default", "calib.n_samples=16",
                   "model.targets='encoder\\.layer\\.0\\..*'", f"results_dir={tmp_path}",
                   "eval.latency.repeats=1", "eval.latency.shapes=[]"])
    row = run(cfg)
    assert row.status == "ok", row.error
    info = row.extra["allocation"]
    assert row.allocation == "spectrum" and row.allocation_shipped == info["shipped"] in ("spectrum", "uniform")
    assert row.allocation_loss_uniform == info["loss_uniform"] and row.allocation_loss == info["loss_candidate"]
    assert row.bits_predicted == row.bits_compressed
    assert row.param_ratio_measured <= 0.5
    shipped = info["candidate_ranks"] if info["shipped"] == "spectrum" else info["uniform_ranks"]
    assert row.extra["layer_ranks"] == shipped


def test_rank_plot(tmp_path):
    from analysis import plot
    from analysis.load import frame
    from lrsweep.row import ResultRow

    names = [f"model.layers.{b}.{t}" for b in range(3) for t in ("self_attn.q_proj", "mlp.down_proj")]
    shapes = {n: [576, 576] if "q_proj" in n else [576, 1536] for n in names}
    rows = []
    for i, alloc in enumerate(["uniform", "spectrum"]):
        ranks = {n: 100 + 10 * i * k for k, n in enumerate(names)}
        rows.append(ResultRow(run_id=str(i), status="ok", model="smollm2", method="svdllm", param_ratio=0.6,
                              allocation=alloc, extra={"layer_ranks": ranks, "layer_shapes": shapes}))
    df = frame(rows)
    rf = plot.rank_frame(df, fraction=True)
    assert set(rf["run"]) == {"svdllm, allocation=uniform", "svdllm, allocation=spectrum"}
    assert set(rf["type"]) == {"q_proj", "down_proj"} and set(rf["block"]) == {0, 1, 2}
    q0 = rf[(rf["run"].str.endswith("uniform")) & (rf["layer"] == names[0])]["value"].item()
    assert q0 == pytest.approx(100 * 1152 / 576**2)
    paths = plot.rank_plot(df, tmp_path / "ranks.png")
    assert paths[0].exists() and paths[0].with_suffix(".pdf").exists()


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_sensitivity_gains_share_each_units_measured_loss(monkeypatch, granularity):
    """Predicted loss at the reference ranks (the gains left out) equals each unit's measured increase."""
    monkeypatch.setattr(allocate.values, "GRANULARITY", granularity)
    g = torch.Generator().manual_seed(3)
    names = [f"model.layers.{b}.{t}" for b in range(2) for t in ("q", "up")]
    spectra = {n: allocate.spectrum(torch.randn(12, 8, generator=g), methods.REGISTRY["svd"], None, {})
               for n in names}
    ref = {n: 2 + i for i, n in enumerate(names)}
    groups = allocate.units(names)
    assert len(groups) == (2 if granularity == "block" else 4)
    delta = {u: 0.1 * (k + 1) for k, u in enumerate(groups)}
    value = allocate.gains("sensitivity", spectra, delta, ref)
    for u, members in groups.items():
        assert sum(value[n][ref[n]:].sum() for n in members) == pytest.approx(delta[u])
    spectrum = allocate.gains("spectrum", spectra, None, None)
    assert all(v.sum() == pytest.approx(1.0) for v in spectrum.values())


def test_the_check_stops_at_the_first_look_when_the_verdict_is_clear():
    """Two looks (batches): a candidate worse on the first is refused there (futility), one better by
    far more than CHECK_STOP_Z se ships there (efficacy); a small gain needs every sample."""
    model = _Toy()
    layers = {"a": model.a, "b": model.b}
    spectra = {n: allocate.spectrum(m.weight, methods.REGISTRY["svd"], None, {}) for n, m in layers.items()}
    uniform, better = {"a": 8, "b": 8}, {"a": 14, "b": 2}
    xs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    target = {id(x): model(x).detach() for x in xs}
    batches = [{"x": x} for x in xs]
    cand_b = spectra["b"].approx(2)
    seen = []

    def shifted(shift):
        def loss(m, batch):
            seen.append(id(batch["x"]))
            base = (m(batch["x"]) - target[id(batch["x"])]).pow(2).mean(1)
            cand = torch.equal(m.b.weight.detach(), cand_b.to(m.b.weight.dtype))
            return base.detach() * (1 - cand) + cand * (shift + 0.01 * torch.arange(8.0))
        return loss

    for shift, stopped, ships in [(1e3, "futility", "uniform"), (-1e3, "efficacy", "candidate")]:
        seen.clear()
        # the uniform losses are the toy's own (positive); the candidate's a constant far above or below them
        ranks, c = allocate.against_uniform(model, layers, spectra, uniform, better, batches, shifted(shift))
        assert c.stopped == stopped and c.samples == 8 and seen == [id(xs[0])] * 2
        assert (ranks is better) == (ships == "candidate")
    seen.clear()

    def close(m, batch):  # better by 1.65 se on the first look (goes on), by 2.42 se on both (ships)
        seen.append(id(batch["x"]))
        cand = torch.equal(m.b.weight.detach(), cand_b.to(m.b.weight.dtype))
        return torch.ones(8) - cand * (0.025 + 0.04 * torch.tensor([1.0, -1.0] * 4))

    ranks, c = allocate.against_uniform(model, layers, spectra, uniform, better, batches, close)
    assert c.stopped == "" and c.samples == 16 and seen == [id(xs[0])] * 2 + [id(xs[1])] * 2
    se = 0.04 * (16 / 15) ** 0.5 / 16 ** 0.5  # of the 16 paired differences
    assert ranks is better and (c.loss_uniform - c.loss_candidate) / c.se == pytest.approx(0.025 / se)
