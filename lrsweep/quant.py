"""Quantizers: float tensor in, stored tensor (integer codes + metadata) out.

Every quantizer returns a :class:`QTensor` that holds what would be written to disk
(integer codes and the scales/zero points needed to decode them) together with the
dequantized value that the compressed model computes with. ``storage_bits`` is counted from
those stored tensors, never from a formula alone.

Supported ``bits``: 2..15 (integer codes), 16 (fp16), 32 (fp32, i.e. unquantized).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FLOAT_BITS = (16, 32)
INT_BITS = tuple(range(2, 16))
SUPPORTED_BITS = INT_BITS + FLOAT_BITS
SCHEMES = ("uniform", "channel", "group")

# The symmetric integer grid (schemes channel and group): codes -2^(b-1) .. 2^(b-1) - 1 times one
# fp16 scale per group; the grid rule says how the scale follows from the group's values (q = 2^(b-1) - 1):
#   narrow: absmax / q              (lrsweep before; code -2^(b-1) is never used)
#   full:   absmax / (q + 0.5)      (llm-compressor's and GPTQ's symmetric default: all 2^b codes,
#                                    the extremes clipped by half a step)
#   tight:  max(max+ / q, max- / (q + 1))  (the smallest scale that clips nothing: all 2^b codes
#                                    when the negative extreme is the larger one)
#   auto:   full at 2-3 bits, tight from 4 bits (measured on SmolLM2 weights: AUTO_FULL_BITS)
#   best:   per group, whichever of full and tight has the lower error (the squared error, or the
#           weighted one of ``weight``: gptq's output error)
GRIDS = ("auto", "full", "tight", "narrow", "best")
BEST_OF = ("full", "tight")  # the rules ``best`` chooses from, in this order on ties
AUTO_FULL_BITS = 3  # auto is ``full`` up to this many bits, ``tight`` above
# How the scale is chosen: absmax (the grid rule on the group's extremes) or mse (the clipping
# ratio p of the grid rule's range, on MSE_STEPS steps from 1 down to MSE_LOWEST, with the least
# squared error of the group; uniform: the tensor's min/max range shrunk by p about its midpoint).
# The error is sum_j weight_j (x_ij - q_ij)^2 with per-column weights when given (gptq passes its own,
# the share of each column's squared error in the output error), else the plain squared error.
OBSERVERS = ("absmax", "mse")
MSE_STEPS, MSE_LOWEST = 100, 0.5


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


def check_rule(grid: str, observer: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"quantizer grid={grid!r} is unknown; valid: {', '.join(GRIDS)}")
    if observer not in OBSERVERS:
        raise ValueError(f"quantizer observer={observer!r} is unknown; valid: {', '.join(OBSERVERS)}")


def grid_rule(grid: str, bits: int) -> str:
    """The rule (full, tight or narrow) that ``grid`` stands for at ``bits`` (``best`` stands for none:
    it chooses per group between :data:`BEST_OF`)."""
    if grid == "auto":
        return "full" if bits <= AUTO_FULL_BITS else "tight"
    return grid


def quantize(x: torch.Tensor, bits: int, scheme: str = "uniform", group_size: int = 128, grid: str = "auto",
             observer: str = "absmax", weight: torch.Tensor | None = None) -> QTensor:
    """Quantize ``x`` (2-D) at ``bits`` bits with the given scheme.

    - ``uniform``: per-tensor min/max grid with 2^b levels (the LPLR paper's quantizer);
    - ``channel``: symmetric integer grid per output row, its scale by the ``grid`` rule (GRIDS);
    - ``group``: the same per group of ``group_size`` consecutive entries of a row.
    ``observer``: ``absmax`` (the range of the values) or ``mse`` (the clipped range with the least
    squared error, per group; per tensor for ``uniform``). ``weight`` (one positive number per column,
    optional): the error that ``mse`` and the ``best`` grid minimize is sum_j weight_j (x_ij - q_ij)^2.
    """
    check_bits(bits)
    check_rule(grid, observer)
    x = x.float()
    if weight is not None and (weight.shape != x.shape[-1:] or not bool((weight > 0).all())):
        raise ValueError(f"weight must hold one positive number per column ({x.shape[-1]}), got {tuple(weight.shape)}")
    if bits in FLOAT_BITS:
        dtype = torch.float16 if bits == 16 else torch.float32
        q = QTensor(value=x.to(dtype).float(), bits=bits)
    elif scheme == "uniform":
        q = _uniform(x, bits, observer, weight)
    elif scheme in ("channel", "group"):
        q = _absmax(x, bits, x.shape[-1] if scheme == "channel" else min(group_size, x.shape[-1]), grid, observer,
                    weight)
    else:
        raise ValueError(f"quantizer scheme={scheme!r} is unknown; valid: {', '.join(SCHEMES)}")
    q.scheme, q.group_size = scheme, group_size
    return q


def requantize(q: QTensor, x: torch.Tensor) -> QTensor:
    """``x`` (new values of the stored tensor ``q``, e.g. after training) quantized onto ``q``'s grid:
    the same bits, scheme and metadata (minimum and step, or the symmetric grid's scales), codes
    clamped to the grid's range (all 2^b codes, whatever rule and observer chose the scales). The
    storage is that of ``q``; only the codes change."""
    if q.scheme is None:
        raise ValueError("this stored tensor was not made by quantize(); it cannot be re-quantized")
    x = x.detach().float().reshape(q.value.shape)
    if q.bits in FLOAT_BITS:
        return quantize(x, q.bits, q.scheme, q.group_size)
    if "step" in q.meta:  # uniform: codes * step + min
        lo, step = q.meta["min"].to(x.device), q.meta["step"].to(x.device)
        stored, value = _uniform_round(x, lo, step, 2**q.bits - 1)
    else:  # symmetric: one scale per group of a row, codes offset by 2^(b-1)
        n, d = x.shape
        scale = q.meta["scale"].float().to(x.device)
        group = d if q.scheme == "channel" else min(q.group_size, d)
        codes, value = symmetric_round(_groups(x, group), scale.unsqueeze(-1), q.bits)
        qmax = 2 ** (q.bits - 1) - 1
        value = value.reshape(n, -1)[:, :d]
        stored = (codes + qmax + 1).reshape(n, -1)[:, :d]
    return QTensor(value=value, bits=q.bits, codes=stored.to(_codes_dtype(q.bits)), meta=dict(q.meta),
                   scheme=q.scheme, group_size=q.group_size)


def _codes_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int16


def _uniform(x: torch.Tensor, bits: int, observer: str = "absmax", weight: torch.Tensor | None = None) -> QTensor:
    lo, hi = x.min(), x.max()
    levels = 2**bits - 1
    if observer == "mse" and hi > lo:  # the range shrunk by p about its midpoint, p with the least error
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        w = _relative(weight)

        def shrunk(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # p = 1: absmax's own range, exactly
            return (lo, hi) if float(p) == 1.0 else (mid - p * half, mid + p * half)

        p = _best_ratio(lambda p: _weighted(_uniform_round(x, shrunk(p)[0], (shrunk(p)[1] - shrunk(p)[0]) / levels,
                                                           levels)[1].sub(x).square(), w).sum().reshape(1))
        lo, hi = shrunk(p)
    step = (hi - lo) / levels
    if step == 0:  # constant tensor: every code is 0
        step = torch.ones_like(step)
    codes, value = _uniform_round(x, lo, step, levels)
    meta = {"min": lo.reshape(1).float(), "step": step.reshape(1).float()}
    return QTensor(value=value, bits=bits, codes=codes.to(_codes_dtype(bits)), meta=meta)


def _uniform_round(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, levels: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.clamp(torch.round((x - lo) / step), 0, levels)
    return codes, codes * step + lo


def mse_ratios(device: torch.device | None = None) -> torch.Tensor:
    """The clipping ratios the mse observer tries: 1, 1 - (1 - MSE_LOWEST) / MSE_STEPS, ..., > MSE_LOWEST."""
    return 1 - torch.arange(MSE_STEPS, device=device, dtype=torch.float32) * ((1 - MSE_LOWEST) / MSE_STEPS)


def _relative(weight: torch.Tensor | None) -> torch.Tensor | None:
    """Column weights over their largest one along the last axis (equal weights are exactly 1: the
    plain search), None for none."""
    return None if weight is None else weight.float() / weight.float().amax(-1, keepdim=True)


def _weighted(sq_error: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return sq_error if weight is None else sq_error * weight


def _best_ratio(error: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per entry of ``error(p)`` (one squared error per group), the ratio p of :func:`mse_ratios` with the
    least error (the first, i.e. the largest p, on ties; p = 1 is the absmax observer's own range)."""
    best_p = best = None
    for p in mse_ratios():
        err = error(p)
        if best is None:
            best, best_p = err, torch.ones_like(err)
        else:
            better = err < best
            best, best_p = torch.where(better, err, best), torch.where(better, p, best_p)
    return best_p


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x (n x d) as (n, ceil(d / group), group), the last group zero-padded."""
    n, d = x.shape
    return torch.nn.functional.pad(x, (0, (-d) % group)).reshape(n, -1, group)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as stored (fp16), 1 where the group is all zeros."""
    return torch.where(scale == 0, torch.ones_like(scale), scale).half().float()


def symmetric_round(xg: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in -2^(b-1) .. 2^(b-1) - 1, dequantized values) of ``xg`` on the grid ``scale`` (broadcast)."""
    qmax = 2 ** (bits - 1) - 1
    codes = torch.clamp(torch.round(xg / scale), -qmax - 1, qmax)
    return codes, codes * scale


def symmetric_error(xg: torch.Tensor, scale: torch.Tensor, bits: int, weight: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Per group of ``xg`` (..., group) -> (..., 1): the squared error of rounding on ``scale``, each
    column's times its ``weight`` (broadcast on ``xg``) when given."""
    return _weighted(symmetric_round(xg, scale, bits)[1].sub(xg).square(), weight).sum(-1, keepdim=True)


def symmetric_scales(xg: torch.Tensor, bits: int, grid: str = "auto", observer: str = "absmax",
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fp16-representable scale of each group of ``xg`` (..., group) -> (..., 1) by the ``grid``
    rule at ``bits``, and with the ``mse`` observer the ratio of it with the least error; ``best``: per
    group the one of :data:`BEST_OF`'s scales with the least error. The error: :func:`symmetric_error`
    with ``weight`` (per column of a group, broadcast on ``xg``; None: the plain squared error)."""
    weight = _relative(weight)
    if grid == "best":
        scales = [symmetric_scales(xg, bits, rule, observer, weight) for rule in BEST_OF]
        errors = [symmetric_error(xg, s, bits, weight) for s in scales]
        return torch.where(errors[1] < errors[0], scales[1], scales[0])
    qmax = 2 ** (bits - 1) - 1
    rule = grid_rule(grid, bits)
    if rule == "tight":
        top = xg.amax(-1, keepdim=True).clamp_min(0) / qmax
        scale = torch.maximum(top, (-xg.amin(-1, keepdim=True)).clamp_min(0) / (qmax + 1))
    else:
        scale = xg.abs().amax(-1, keepdim=True) / (qmax + 0.5 if rule == "full" else qmax)
    if observer == "mse":
        scale = _best_ratio(lambda p: symmetric_error(xg, _fp16_scale(p * scale), bits, weight)) * scale
    return _fp16_scale(scale)


def _absmax(x: torch.Tensor, bits: int, group: int, grid: str = "auto", observer: str = "absmax",
            weight: torch.Tensor | None = None) -> QTensor:
    n, d = x.shape
    xp = _groups(x, group)
    if weight is not None:  # (groups, group), the padding's weight 0 (its error is 0 anyway)
        weight = _groups(weight.float().reshape(1, d), group)[0]
    scale = symmetric_scales(xp, bits, grid, observer, weight)
    codes, value = symmetric_round(xp, scale, bits)
    qmax = 2 ** (bits - 1) - 1
    stored_codes = (codes + qmax + 1).reshape(n, -1)[:, :d].to(_codes_dtype(bits))
    meta = {"scale": scale.reshape(n, -1).half()}
    return QTensor(value=value.reshape(n, -1)[:, :d], bits=bits, codes=stored_codes, meta=meta)


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
