"""Quantizers: float tensor in, stored tensor (integer codes + metadata) out.

Every quantizer returns a :class:`QTensor` that holds what would be written to disk
(integer codes and the scales/zero points needed to decode them) together with the
dequantized value that the compressed model computes with. ``storage_bits`` is counted from
those stored tensors, never from a formula alone.

Supported ``bits``: 2..15 (integer codes), 16 (fp16), 32 (fp32, i.e. unquantized).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FLOAT_BITS = (16, 32)
INT_BITS = tuple(range(2, 16))
SUPPORTED_BITS = INT_BITS + FLOAT_BITS
SCHEMES = ("uniform", "channel", "group")


@dataclass
class QTensor:
    """A stored tensor: integer codes at ``bits`` bits each plus metadata, or a float tensor."""

    value: torch.Tensor  # dequantized values (fp32), what the model computes with
    bits: int  # bits of each stored entry
    codes: torch.Tensor | None = None  # integer codes (None when stored as float)
    meta: dict[str, torch.Tensor] = field(default_factory=dict)  # scales, minima, ...
    scheme: str | None = None  # the quantizer that made it (None: not from ``quantize``, e.g. indices)
    group_size: int = 128

    @property
    def storage_bits(self) -> int:
        stored = self.codes if self.codes is not None else self.value
        meta = sum(t.numel() * t.element_size() * 8 for t in self.meta.values())
        return int(stored.numel()) * self.bits + int(meta)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that are saved to disk for this entry."""
        if self.codes is None:
            dtype = torch.float16 if self.bits == 16 else torch.float32
            return {"value": self.value.to(dtype)}
        return {"codes": self.codes, **self.meta}


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; valid: 2..15, 16, 32")


def quantize(x: torch.Tensor, bits: int, scheme: str = "uniform", group_size: int = 128) -> QTensor:
    """Quantize ``x`` (2-D) at ``bits`` bits with the given scheme.

    - ``uniform``: per-tensor min/max grid with 2^b levels (the LPLR paper's quantizer);
    - ``channel``: symmetric absmax per output row;
    - ``group``: symmetric absmax per group of ``group_size`` consecutive entries of a row.
    """
    check_bits(bits)
    x = x.float()
    if bits in FLOAT_BITS:
        dtype = torch.float16 if bits == 16 else torch.float32
        q = QTensor(value=x.to(dtype).float(), bits=bits)
    elif scheme == "uniform":
        q = _uniform(x, bits)
    elif scheme == "channel":
        q = _absmax(x, bits, group=x.shape[-1])
    elif scheme == "group":
        q = _absmax(x, bits, group=min(group_size, x.shape[-1]))
    else:
        raise ValueError(f"quantizer scheme={scheme!r} is unknown; valid: {', '.join(SCHEMES)}")
    q.scheme, q.group_size = scheme, group_size
    return q


def requantize(q: QTensor, x: torch.Tensor) -> QTensor:
    """``x`` (new values of the stored tensor ``q``, e.g. after training) quantized onto ``q``'s grid:
    the same bits, scheme and metadata (minimum and step, or the absmax scales), codes clamped to
    the grid's range. The storage is that of ``q``; only the codes change."""
    if q.scheme is None:
        raise ValueError("this stored tensor was not made by quantize(); it cannot be re-quantized")
    x = x.detach().float().reshape(q.value.shape)
    if q.bits in FLOAT_BITS:
        return quantize(x, q.bits, q.scheme, q.group_size)
    if "step" in q.meta:  # uniform: codes * step + min
        lo, step = q.meta["min"].to(x.device), q.meta["step"].to(x.device)
        codes = torch.clamp(torch.round((x - lo) / step), 0, 2**q.bits - 1)
        value, stored = codes * step + lo, codes
    else:  # absmax: one scale per group of a row, codes offset by 2^(b-1)
        n, d = x.shape
        scale = q.meta["scale"].float().to(x.device)
        group = d if q.scheme == "channel" else min(q.group_size, d)
        xp = torch.nn.functional.pad(x, (0, (-d) % group)).reshape(n, -1, group)
        qmax = 2 ** (q.bits - 1) - 1
        codes = torch.clamp(torch.round(xp / scale.unsqueeze(-1)), -qmax - 1, qmax)
        value = (codes * scale.unsqueeze(-1)).reshape(n, -1)[:, :d]
        stored = (codes + qmax + 1).reshape(n, -1)[:, :d]
    return QTensor(value=value, bits=q.bits, codes=stored.to(_codes_dtype(q.bits)), meta=dict(q.meta),
                   scheme=q.scheme, group_size=q.group_size)


def _codes_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int16


def _uniform(x: torch.Tensor, bits: int) -> QTensor:
    lo, hi = x.min(), x.max()
    levels = 2**bits - 1
    step = (hi - lo) / levels
    if step == 0:  # constant tensor: every code is 0
        step = torch.ones_like(step)
    codes = torch.clamp(torch.round((x - lo) / step), 0, levels)
    value = codes * step + lo
    meta = {"min": lo.reshape(1).float(), "step": step.reshape(1).float()}
    return QTensor(value=value, bits=bits, codes=codes.to(_codes_dtype(bits)), meta=meta)


def _absmax(x: torch.Tensor, bits: int, group: int) -> QTensor:
    n, d = x.shape
    pad = (-d) % group
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(n, -1, group)
    qmax = 2 ** (bits - 1) - 1
    scale = xp.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().float()
    codes = torch.clamp(torch.round(xp / scale), -qmax - 1, qmax)
    value = (codes * scale).reshape(n, -1)[:, :d]
    stored_codes = (codes + qmax + 1).reshape(n, -1)[:, :d].to(_codes_dtype(bits))
    meta = {"scale": scale.reshape(n, -1).half()}
    return QTensor(value=value, bits=bits, codes=stored_codes, meta=meta)


def metadata_bits(shape: tuple[int, int], bits: int, scheme: str, group_size: int = 128) -> int:
    """Metadata bits of ``quantize`` for a tensor of ``shape`` (the formula the tests check)."""
    n, d = shape
    if bits in FLOAT_BITS or n * d == 0:  # an empty tensor (rank 0) stores nothing
        return 0
    if scheme == "uniform":
        return 2 * 32
    group = d if scheme == "channel" else min(group_size, d)
    return n * (-(-d // group)) * 16


def tensor_bits(shape: tuple[int, int], bits: int, scheme: str, group_size: int = 128) -> int:
    """Total stored bits of a ``shape`` tensor quantized at ``bits`` (entries + metadata)."""
    return shape[0] * shape[1] * bits + metadata_bits(shape, bits, scheme, group_size)
