"""Naive quantization of W at ``bits`` bits: no factorization (the baseline LPLR compares with)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.factorization import Dense
from lrsweep.methods import LayerStats, QuantizerOptions, register


@dataclass
class QuantOptions(QuantizerOptions):
    pass


def quant_bits(n: int, d: int, rank: int, bits: int, o: QuantizerOptions) -> int:
    return o.tensor_bits((n, d), bits)


@register("quant", QuantOptions, storage_bits=quant_bits, has_rank=False)
def quant(W: torch.Tensor, o: QuantOptions, *, rank: int | None = None, bits: int = 8, seed: int = 0,
          stats: LayerStats | None = None) -> Dense:
    return Dense.of(o.quantize(W.float(), bits), scheme=o.scheme)
