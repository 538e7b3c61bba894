"""Quantizers: error bounds, codes that fit their bits, and metadata bits counted honestly."""

from __future__ import annotations

import itertools

import pytest
import torch

from lrsweep.quant import INT_BITS, SUPPORTED_BITS, metadata_bits, quantize, tensor_bits


def matrix(n=96, d=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 3 + 0.5


def stored_bits(q) -> int:
    """Bits of what is written: entries at q.bits each, metadata at its dtype's width."""
    entries = (q.codes if q.codes is not None else q.value).numel() * q.bits
    return entries + sum(t.numel() * t.element_size() * 8 for t in q.meta.values())


@pytest.mark.parametrize("bits", INT_BITS)
def test_uniform_error_at_most_half_a_step(bits):
    x = matrix()
    q = quantize(x, bits, "uniform")
    step = (x.max() - x.min()) / (2**bits - 1)
    assert torch.allclose(q.meta["step"], step.reshape(1))
    fp32_rounding = 4 * torch.finfo(torch.float32).eps * x.abs().max()  # of codes * step + min
    assert (q.value - x).abs().max() <= step / 2 + fp32_rounding
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    # the stored codes and metadata decode to exactly the value the model computes with
    assert torch.allclose(q.codes.float() * q.meta["step"] + q.meta["min"], q.value)


@pytest.mark.parametrize("grid", ["auto", "full", "tight", "narrow", "best"])
@pytest.mark.parametrize("scheme,group", [("channel", None), ("group", 16), ("group", 48)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_absmax_error_at_most_half_a_step_per_group(scheme, group, bits, grid):
    """Every grid rule covers the group's range: the error is at most half a step (up to the fp16
    rounding of the scale, which moves the clipped extremes of ``full`` by (q + 1) ulps)."""
    x = matrix()
    n, d = x.shape
    q = quantize(x, bits, scheme, group_size=group or 128, grid=grid)
    g = d if scheme == "channel" else group
    scale = q.meta["scale"].float()  # (n, groups)
    assert scale.shape == (n, -(-d // g))
    per_entry = scale.repeat_interleave(g, dim=1)[:, :d]
    qmax = 2 ** (bits - 1) - 1
    assert ((q.value - x).abs() <= per_entry * (0.5 + (qmax + 1) * 2.0**-11)).all()
    assert int(q.codes.max()) <= 2**bits - 1
    decoded = (q.codes.float() - qmax - 1) * per_entry
    assert torch.allclose(decoded, q.value)


@pytest.mark.parametrize("scheme", ["uniform", "channel", "group"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_storage_bits_counted_from_stored_tensors(scheme, bits):
    x = matrix(40, 100)
    q = quantize(x, bits, scheme, group_size=32)
    assert q.storage_bits == stored_bits(q) == tensor_bits(x.shape, bits, scheme, 32)
    assert metadata_bits(x.shape, bits, scheme, 32) == q.storage_bits - x.numel() * bits
    if bits in INT_BITS:
        expect = {"uniform": 64, "channel": 40 * 16, "group": 40 * 4 * 16}[scheme]
        assert metadata_bits(x.shape, bits, scheme, 32) == expect
    saved = q.tensors()
    assert all(t.dtype in (torch.uint8, torch.int16, torch.float16, torch.float32) for t in saved.values())
    if bits in INT_BITS:
        assert int(q.codes.min()) >= 0 and int(q.codes.max()) < 2**bits


@pytest.mark.parametrize("scheme", ["uniform", "channel", "group"])
def test_error_falls_as_bits_rise(scheme):
    x = matrix()
    errs = [float((quantize(x, b, scheme, 32).value - x).norm()) for b in (2, 3, 4, 6, 8, 16, 32)]
    assert all(a > b for a, b in itertools.pairwise(errs[:-1]))
    assert errs[-1] == 0.0


def test_float_bits_and_constant_tensors():
    x = matrix()
    assert torch.equal(quantize(x, 32).value, x)
    assert torch.equal(quantize(x, 16).value, x.half().float())
    c = torch.full((8, 8), 0.25)
    assert torch.equal(quantize(c, 3, "uniform").value, c)  # step 0: every code is 0, min is exact
    for scheme in ("channel", "group"):  # tight / narrow with an fp16 scale: exact up to the scale's rounding
        for grid in ("tight", "narrow"):
            assert torch.allclose(quantize(c, 3, scheme, grid=grid).value, c, rtol=1e-3)
        # full (auto's rule at 3 bits) clips the extreme by half a step: 0.25 = 3.5 steps -> code 3
        assert torch.allclose(quantize(c, 3, scheme).value, c * 3 / 3.5, rtol=1e-3)
    z = torch.zeros(4, 6)
    assert torch.equal(quantize(z, 4, "channel").value, z)


def test_half_inputs_quantize_in_fp32():
    x = matrix().bfloat16()
    q = quantize(x, 4, "group", 32)
    assert q.value.dtype == torch.float32
    assert (q.value - x.float()).abs().max() < x.float().abs().max() / 7


def test_bad_bits_and_scheme():
    with pytest.raises(ValueError, match="bits=17"):
        quantize(matrix(), 17)
    with pytest.raises(ValueError, match="bits=1"):
        quantize(matrix(), 1)
    with pytest.raises(ValueError, match="scheme='nf5'"):
        quantize(matrix(), 4, "nf5")


@pytest.mark.parametrize("scheme", ["uniform", "channel", "group"])
@pytest.mark.parametrize("bits", [2, 4, 9])
def test_requantize_onto_the_same_grid(scheme, bits):
    """requantize keeps the grid (metadata, bits, storage) and only moves codes: idempotent on
    grid values, within half a step of in-range values, clamped outside the range."""
    from lrsweep.quant import requantize

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(24, 70, generator=g)
    q = quantize(x, bits, scheme, group_size=32)
    same = requantize(q, q.value)
    assert torch.equal(same.value, q.value) and torch.equal(same.codes, q.codes)
    moved = requantize(q, x + 0.05 * torch.randn(24, 70, generator=g))
    assert moved.storage_bits == q.storage_bits and moved.meta.keys() == q.meta.keys()
    assert all(torch.equal(moved.meta[k], q.meta[k]) for k in q.meta)
    assert not torch.equal(moved.codes, q.codes)
    assert int(moved.codes.min()) >= 0 and int(moved.codes.max()) <= 2**bits - 1
    if scheme == "uniform":
        step, lo = float(q.meta["step"]), float(q.meta["min"])
        inside = (x >= lo) & (x <= lo + step * (2**bits - 1))
        assert float((requantize(q, x).value - x)[inside].abs().max()) <= step / 2 + 1e-6
        big = requantize(q, torch.full((24, 70), 1e3))
        assert torch.allclose(big.value, torch.full((24, 70), lo + step * (2**bits - 1)))  # clamped to the range


# ---- grid rules and the mse observer ---------------------------------------------------------------
GRIDS = ["auto", "full", "tight", "narrow", "best"]


@pytest.mark.parametrize("grid", ["full", "tight"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_full_signed_range_uses_all_2b_codes(grid, bits):
    """full on a symmetric input (an even grid of values in [-a, a], each row its own a) hits every one
    of the 2^b codes, -2^(b-1) included; so does tight on an input whose negative extreme is the larger
    (values in [-(q + 1) c, q c]); narrow (the grid before) never uses -2^(b-1) on the same inputs."""
    levels, q = 2**bits, 2 ** (bits - 1) - 1
    row = torch.linspace(-1, 1, 4 * levels) if grid == "full" else torch.linspace(-(q + 1), q, 4 * levels)
    x = torch.stack([row * (i + 1) for i in range(3)])
    codes = quantize(x, bits, "channel", grid=grid).codes
    for r in range(3):
        assert torch.unique(codes[r]).numel() == levels
    assert int(quantize(x, bits, "channel", grid="narrow").codes.min()) == 1  # code -2^(b-1) (stored 0) unused
    if grid == "full" and bits <= 3:  # auto's rule at 2-3 bits
        assert torch.equal(quantize(x, bits, "channel").codes, codes)


def test_auto_is_full_up_to_3_bits_and_tight_above():
    from lrsweep.quant import AUTO_FULL_BITS, grid_rule

    assert [grid_rule("auto", b) for b in (2, 3, 4, 8)] == ["full", "full", "tight", "tight"] and AUTO_FULL_BITS == 3
    x = matrix()
    for b in (2, 3, 4, 8):
        rule = grid_rule("auto", b)
        assert torch.equal(quantize(x, b, "group", 32).value, quantize(x, b, "group", 32, grid=rule).value)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_rules_scales(bits):
    """narrow: absmax / q; full: absmax / (q + 0.5); tight: the smallest scale that clips nothing, which
    is never above narrow's (q = 2^(b-1) - 1; scales as stored, fp16)."""
    x = matrix(8, 64)
    q, amax = 2 ** (bits - 1) - 1, x.abs().amax(1)
    scale = {g: quantize(x, bits, "channel", grid=g).meta["scale"].float()[:, 0] for g in ("narrow", "full", "tight")}
    torch.testing.assert_close(scale["narrow"], (amax / q).half().float())
    torch.testing.assert_close(scale["full"], (amax / (q + 0.5)).half().float())
    tight = torch.maximum(x.amax(1).clamp_min(0) / q, (-x.amin(1)).clamp_min(0) / (q + 1)).half().float()
    torch.testing.assert_close(scale["tight"], tight)
    assert (scale["tight"] <= scale["narrow"]).all()
    codes = quantize(x, bits, "channel", grid="tight").codes.float() - q - 1
    assert ((codes == q) | (codes == -q - 1)).any(1).all()  # each row's binding extreme is on the end of the grid


def group_errors(x: torch.Tensor, q, group: int) -> torch.Tensor:
    n, d = x.shape
    e = torch.nn.functional.pad((q.value - x).square(), (0, (-d) % group))
    return e.reshape(n, -1, group).sum(-1)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("scheme,group", [("uniform", None), ("channel", None), ("group", 16), ("group", 48)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_never_has_higher_error_than_absmax(grid, scheme, group, bits):
    """Per group (per tensor for uniform): the mse observer's squared error is at most the absmax
    observer's (ratio 1 is one of its candidates), and lower in total at low bits on heavy tails;
    bits, metadata and the decoding are those of absmax."""
    torch.manual_seed(bits)  # StudentT samples from the global generator: the same input whatever ran before
    x = torch.distributions.StudentT(3.0).sample((40, 96)) * torch.rand(40, 1)
    a = quantize(x, bits, scheme, group or 128, grid=grid)
    m = quantize(x, bits, scheme, group or 128, grid=grid, observer="mse")
    width = x.shape[1] if scheme in ("uniform", "channel") else group
    ea, em = group_errors(x, a, width), group_errors(x, m, width)
    if scheme == "uniform":
        ea, em = ea.sum(), em.sum()
    assert (em <= ea * (1 + 1e-6)).all()
    if bits <= 3:  # best's absmax already takes per group the better of two scales: less left to find
        assert em.sum() < (0.97 if grid == "best" else 0.95) * ea.sum()
    assert m.storage_bits == a.storage_bits == tensor_bits(x.shape, bits, scheme, group or 128)
    assert {k: (v.shape, v.dtype) for k, v in m.meta.items()} == {k: (v.shape, v.dtype) for k, v in a.meta.items()}
    if scheme != "uniform":
        per_entry = m.meta["scale"].float().repeat_interleave(width, dim=1)[:, :x.shape[1]]
        assert torch.equal((m.codes.float() - 2 ** (bits - 1)) * per_entry, m.value)


@pytest.mark.parametrize("grid, top", [("full", 3.5), ("tight", 3.0), ("narrow", 3.0)])
def test_mse_finds_a_known_optimum(grid, top):
    """One group at 3 bits: 63 values on the grid of step 0.2 (codes -4..3) and an outlier 1.0. Near
    s = 0.2 the codes stay put and the squared error is sum_k (k s - 0.2 k)^2 + (1 - 3 s)^2, least at
    s* = (0.2 K + 3) / (K + 9), K = sum k^2 = 396: the search lands within one of its steps of s*, at
    an error within that step's quadratic rise of the optimum (absmax's error is 2.5x or more)."""
    vals = torch.tensor([-0.8, -0.6, -0.4, -0.2, 0.2, 0.4, 0.6] * 9)
    x = torch.cat([torch.tensor([1.0]), vals]).reshape(1, 64)
    K = float((vals / 0.2).square().sum())
    s_opt = (0.2 * K + 3) / (K + 9)
    e_opt = (s_opt - 0.2) ** 2 * K + (1 - 3 * s_opt) ** 2
    step = 0.005 * 1.0 / top  # the search's step in scale: 0.5% of the rule's scale (absmax 1.0 / top)
    q = quantize(x, 3, "group", 64, grid=grid, observer="mse")
    err = float((q.value - x).square().sum())
    assert abs(float(q.meta["scale"]) - s_opt) <= step
    assert e_opt - 1e-5 <= err <= e_opt + (K + 9) * step**2 + 1e-4
    assert float((quantize(x, 3, "group", 64, grid=grid).value - x).square().sum()) > 2.5 * err


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("observer", ["absmax", "mse"])
@pytest.mark.parametrize("scheme", ["uniform", "channel", "group"])
def test_requantize_is_quantize_on_its_own_input(grid, observer, scheme):
    """requantize keeps any rule's scales and the full code range: on the input it was made from it
    gives the very codes of quantize."""
    from lrsweep.quant import requantize

    x = matrix(24, 70)
    q = quantize(x, 3, scheme, 32, grid=grid, observer=observer)
    again = requantize(q, x)
    assert torch.equal(again.codes, q.codes) and torch.equal(again.value, q.value)
    assert again.storage_bits == q.storage_bits


def test_bad_grid_and_observer():
    with pytest.raises(ValueError, match=r"grid='wide' is unknown; valid: auto, full, tight, narrow, best"):
        quantize(matrix(), 4, "group", grid="wide")
    with pytest.raises(ValueError, match=r"observer='minmax' is unknown; valid: absmax, mse"):
        quantize(matrix(), 4, "group", observer="minmax")
    for weight in (torch.ones(63), torch.ones(64, 1), torch.zeros(64)):  # one positive number per column
        with pytest.raises(ValueError, match=r"weight must hold one positive number per column \(64\)"):
            quantize(matrix(), 4, "group", observer="mse", weight=weight)


# ---- the best grid and the weighted error -----------------------------------------------------------


@pytest.mark.parametrize("observer", ["absmax", "mse"])
@pytest.mark.parametrize("scheme,group", [("channel", None), ("group", 16), ("group", 48)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_best_is_per_group_the_better_of_full_and_tight(observer, scheme, group, bits):
    """grid best: each group's scale is full's or tight's (with the same observer), the one with the
    lower squared error (full's on a tie); so its error is the per-group minimum of the two."""
    torch.manual_seed(bits)
    x = torch.distributions.StudentT(3.0).sample((40, 96)) * torch.rand(40, 1)
    width = x.shape[1] if scheme == "channel" else group
    q = {g: quantize(x, bits, scheme, group or 128, grid=g, observer=observer) for g in ("full", "tight", "best")}
    err = {g: group_errors(x, v, width) for g, v in q.items()}
    full_wins = err["full"] <= err["tight"]
    expect = torch.where(full_wins, q["full"].meta["scale"], q["tight"].meta["scale"])
    assert torch.equal(q["best"].meta["scale"], expect)
    assert torch.equal(err["best"], torch.minimum(err["full"], err["tight"]))
    assert (~full_wins).any() and full_wins.any()  # both rules win somewhere on this input: the test can tell


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("scheme", ["uniform", "channel", "group"])
def test_equal_column_weights_are_the_plain_search(grid, scheme):
    """weight = c for every column (gptq's weights when H = c I) chooses what the plain squared error
    chooses, to the bit: the same codes and scales."""
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((24, 70))
    for observer in ("absmax", "mse"):
        plain = quantize(x, 3, scheme, 32, grid=grid, observer=observer)
        for c in (1.0, 7.0, 1e-3):
            weighted = quantize(x, 3, scheme, 32, grid=grid, observer=observer, weight=torch.full((70,), c))
            assert torch.equal(weighted.codes, plain.codes) and torch.equal(weighted.value, plain.value)
            assert all(torch.equal(weighted.meta[k], v) for k, v in plain.meta.items())


@pytest.mark.parametrize("grid", ["full", "tight", "best"])
def test_a_heavy_column_keeps_its_values(grid):
    """The group of the known optimum below (an outlier 1.0 in column 0, 63 values on a grid of step 0.2):
    the plain mse search clips the outlier (scale near 0.2, so 1.0 becomes 0.6). With column 0 weighted
    1000 times the others, the search keeps it: its error falls below the plain choice's, to zero where
    the candidates hold the scale that clips nothing (tight's and best's: 1/3), and the others' rises."""
    vals = torch.tensor([-0.8, -0.6, -0.4, -0.2, 0.2, 0.4, 0.6] * 9)
    x = torch.cat([torch.tensor([1.0]), vals]).reshape(1, 64)
    weight = torch.ones(64)
    weight[0] = 1000.0
    plain = quantize(x, 3, "group", 64, grid=grid, observer="mse")
    heavy = quantize(x, 3, "group", 64, grid=grid, observer="mse", weight=weight)
    e_plain, e_heavy = (plain.value - x).abs()[0], (heavy.value - x).abs()[0]
    assert float(e_plain[0]) > 0.35  # clipped to about 0.6
    assert float(e_heavy[0]) < 0.5 * float(e_plain[0])
    if grid != "full":  # full's largest candidate, absmax / 3.5, clips 1.0 by half a step
        assert float(e_heavy[0]) < 1e-3 and abs(float(heavy.meta["scale"]) - 1 / 3) < 1e-3
    assert float(e_heavy[1:].square().sum()) > float(e_plain[1:].square().sum())
    assert float((weight * (heavy.value - x)[0].square()).sum()) < float((weight * (plain.value - x)[0].square()).sum())
