"""What one job knows while it works on a grid point: passed to calibration, the compression
schedule, allocation, evaluation and healing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig


@dataclass
class Context:
    cfg: DictConfig  # the composed config of the grid point
    tokenizer: Any  # the model's tokenizer (None for models without one)
    device: str  # where the model computes: "cpu", "cuda:0", ...
    cache_dir: str  # absolute path of the on-disk cache (lrsweep.cache)
    model_key: dict[str, Any]  # what identifies the dense model (path, file hash, dtype, ...)
