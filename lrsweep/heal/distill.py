"""heal=distill: train the tensors the factorizations store, then re-quantize them.

What trains is each factorization's ``trainable(module)`` (L and R of a low-rank layer, A and B of
a Kronecker layer, the quantized W of ``quant``; sparse supports and biases stay frozen). After
training every trained tensor is quantized again with its own quantizer (same bits, scheme and
group size), and the module computes with the re-quantized values: the storage bits do not change
and the row's metrics are those of the model as stored.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lrsweep.compress import LayerResult
from lrsweep.heal import register
from lrsweep.quant import requantize


def factorization(result: LayerResult):
    if result.factorization is None:
        raise RuntimeError(f"{result.name}: healing needs the layer's factorization (kept when heal is set)")
    return result.factorization


def prepare(model: nn.Module, results: list[LayerResult], originals: dict[str, nn.Module],
            hcfg: DictConfig) -> list[nn.Parameter]:
    params: dict[int, nn.Parameter] = {}  # by id: tied modules share their parameters
    for r in results:
        for p in factorization(r).trainable(model.get_submodule(r.name)).values():
            params[id(p)] = p
    return list(params.values())


@torch.no_grad()
def finish(model: nn.Module, results: list[LayerResult], originals: dict[str, nn.Module],
           hcfg: DictConfig) -> dict[str, Any]:
    frozen = []
    for r in results:
        f = factorization(r)
        trainable = f.trainable(model.get_submodule(r.name))
        if not trainable:
            frozen.append(r.name)
        for key, p in trainable.items():
            f.stored[key] = requantize(f.stored[key], p.float())
            p.copy_(f.stored[key].value.reshape(p.shape).to(p.dtype))
        r.rel_err = f.rel_error(originals[r.name].weight.detach())
        r.storage_bits = f.storage_bits
    return {"requantized": True, "frozen_layers": frozen}


register("distill", prepare=prepare, finish=finish)
