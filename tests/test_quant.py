"""Quantizers: error bounds, codes that fit their bits, and metadata bits counted honestly."""

from __future__ import annotations

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


@pytest.mark.parametrize("scheme,group", [("channel", None), ("group", 16), ("group", 48)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_absmax_error_at_most_half_a_step_per_group(scheme, group, bits):
    x = matrix()
    n, d = x.shape
    q = quantize(x, bits, scheme, group_size=group or 128)
    g = d if scheme == "channel" else group
    scale = q.meta["scale"].float()  # (n, groups)
    assert scale.shape == (n, -(-d // g))
    per_entry = scale.repeat_interleave(g, dim=1)[:, :d]
    assert ((q.value - x).abs() <= per_entry / 2 * (1 + 1e-4)).all()
    assert int(q.codes.max()) <= 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
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
    assert all(a > b for a, b in zip(errs, errs[1:-1]))
    assert errs[-1] == 0.0


def test_float_bits_and_constant_tensors():
    x = matrix()
    assert torch.equal(quantize(x, 32).value, x)
    assert torch.equal(quantize(x, 16).value, x.half().float())
    c = torch.full((8, 8), 0.25)
    assert torch.equal(quantize(c, 3, "uniform").value, c)  # step 0: every code is 0, min is exact
    for scheme in ("channel", "group"):  # absmax with an fp16 scale: exact up to the scale's rounding
        assert torch.allclose(quantize(c, 3, scheme).value, c, rtol=1e-3)
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
