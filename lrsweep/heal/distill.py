"""heal=distill: train the tensors the factorizations store, then re-quantize them.

What trains is each factorization's ``trainable(module)`` (L and R of a low-rank layer, A and B of
a Kronecker layer, the quantized W of ``quant``; sparse supports and biases stay frozen). After
training each tensor is quantized onto its own quantizer's grid (same bits, scheme and scale
metadata: ``quant.requantize``; with ``heal.qat`` it trains through that quantizer), the module
computes with the stored values, the storage bits do not change and the row's metrics are those
of the model as stored.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lrsweep.compress import LayerResult
from lrsweep.heal import Trained, register
from lrsweep.quant import QTensor, requantize


def factorization(result: LayerResult):
    if result.factorization is None:
        raise RuntimeError(f"{result.name}: healing needs the layer's factorization (kept when heal is set)")
    return result.factorization


def prepare(model: nn.Module, results: list[LayerResult], originals: dict[str, nn.Module],
            hcfg: DictConfig) -> list[Trained]:
    trained: dict[int, Trained] = {}  # by id: tied modules share their parameters
    for r in results:
        f = factorization(r)
        for key, p in f.trainable(model.get_submodule(r.name)).items():
            trained[id(p)] = Trained(p, partial(_requantized, f.stored[key]))
    return list(trained.values())


def _requantized(q: QTensor, x: torch.Tensor) -> torch.Tensor:
    return requantize(q, x).value


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
        r.storage_bits, r.params = f.storage_bits, f.params
    return {"requantized": True, "frozen_layers": frozen}


register("distill", prepare=prepare, finish=finish)
