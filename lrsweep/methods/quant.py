"""Naive quantization of W at ``bits`` bits: no factorization (the baseline LPLR compares with)."""

from __future__ import annotations

import torch

from lrsweep.factorization import Dense
from lrsweep.methods import register
from lrsweep.quant import quantize, tensor_bits


def quant_bits(n: int, d: int, rank: int, bits: int, scheme: str = "uniform", group_size: int = 128, **_) -> int:
    return tensor_bits((n, d), bits, scheme, group_size)


@register("quant", storage_bits=quant_bits, has_rank=False)
def quant(W: torch.Tensor, *, rank: int | None = None, bits: int = 8, seed: int = 0, stats=None,
          scheme: str = "uniform", group_size: int = 128) -> Dense:
    return Dense.of(quantize(W.float(), bits, scheme, group_size), scheme=scheme)
