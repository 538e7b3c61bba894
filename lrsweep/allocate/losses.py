"""The model's calibration loss with target layers swapped for truncated weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep.calib import SOURCES, to_device


class Swap:
    """Temporarily set target weights to given matrices (restored on exit)."""

    def __init__(self, layers: dict[str, nn.Module], weights: dict[str, torch.Tensor]):
        self.layers, self.weights, self.saved = layers, weights, {}

    def __enter__(self):
        for name, W in self.weights.items():
            p = self.layers[name].weight
            self.saved[name] = p.data
            p.data = W.to(p.device, p.dtype).reshape(p.shape)
        return self

    def __exit__(self, *exc):
        for name, data in self.saved.items():
            self.layers[name].weight.data = data


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[dict], loss_fn) -> float:
    """The mean over batches of each batch's mean loss."""
    return float(np.mean([float(loss_fn(model, b).float().mean()) for b in batches]))


@torch.no_grad()
def sample_losses(model: nn.Module, batches: list[dict], loss_fn) -> np.ndarray:
    """Each held-out sample's loss (a loss_fn returning one value per batch counts as one sample)."""
    return np.concatenate([np.atleast_1d(loss_fn(model, b).float().cpu().numpy()) for b in batches])


def calibration_batches(cfg: DictConfig, tokenizer: Any, seed: int, samples: int, device: str,
                        batch_size: int | None = None) -> list[dict]:
    """``samples`` calibration windows/texts drawn with ``seed`` (in one batch unless ``batch_size``)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg.calib, resolve=True))
    c.seed, c.n_samples, c.batch_size = int(seed), int(samples), int(batch_size or samples)
    return [to_device(b, device) for b in SOURCES[cfg.model.kind].batches(c, tokenizer)]
