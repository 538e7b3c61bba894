"""A packed job: grid points run one after another in one process, sharing their dense model.

The dense model of a point is loaded, measured (task.prepare, latency) and snapshotted once for the
points of the job that share it (lrsweep.job.dense_key); after each point its modules, weights,
requires_grad flags and RNG state are put back (:meth:`Pack.release`), so a point runs on the same
dense model as in its own job. A single run is a pack of one that keeps nothing (``Pack()``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lrsweep.checkpoint import Attempt

log = logging.getLogger(__name__)


@dataclass
class Dense:
    """The dense model of a grid point and what is measured on it before compression."""

    key: str
    model: Any
    tokenizer: Any
    model_key: dict[str, Any]
    state: Any
    speed: Any  # None while a sibling job times it (lrsweep.shared_latency.pending)
    params: int
    rng: Any
    waited_s: float
    how: str  # how the dense latency was measured (row.extra.latency_measurement)
    modules: dict[str, Any] = field(default_factory=dict)  # the originals, restored after a point
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    training: bool = False
    points: int = 0


@dataclass
class Pack:
    """The job running in this process: its size, the launch's share folder (dense latencies shared
    between the sweep's jobs; None outside a sweep), the dense model kept between its points, and
    the attempt at the point running now (saved by the launcher on preemption). ``reuse``: keep the
    dense model for the next point (a sweep's job); off for a single run."""

    size: int = 1
    share: str | os.PathLike | None = None
    reuse: bool = False
    dense: Dense | None = None
    taken_over: bool = False  # running a point of a sibling job (lrsweep.sweep.worker)
    attempt: Attempt | None = None

    def dense_for(self, key: str, load: Callable[[], Dense]) -> Dense:
        """The dense model of ``key``: the previous point's when it shares it (its RNG state put back as
        right after the dense measurements), else ``load()``ed and snapshotted."""
        d = self.dense
        if d is not None and d.key == key:
            torch.set_rng_state(d.rng)
        else:
            self.dense = None
            d = load()
            if self.reuse:
                d.modules = dict(d.model.named_modules())
                d.weights = {k: v.detach().to("cpu", copy=True) for k, v in d.model.state_dict(keep_vars=True).items()}
                d.requires_grad = {n: p.requires_grad for n, p in d.model.named_parameters()}
                d.training = d.model.training
                self.dense = d
        d.points += 1
        return d

    def release(self, device: str) -> None:
        """After a point (ok or failed): restore the dense model for the next one; a model that cannot
        be restored is dropped (the next point loads it again)."""
        d = self.dense
        if d is None:
            return
        try:
            if not _restore(d, device):
                self.dense = None
        except Exception as e:
            log.warning(f"[lrsweep] dense model not restored ({e}); the next point reloads it")
            self.dense = None


@torch.no_grad()
def _restore(d: Dense, device: str) -> bool:
    """Put the dense model back as loaded: modules, weights, requires_grad, mode; False when something
    cannot be undone."""
    for name, module in d.modules.items():  # parents first: each original parent gets its original children
        if name:
            parent, _, attr = name.rpartition(".")
            if getattr(d.modules[parent], attr, None) is not module:
                setattr(d.modules[parent], attr, module)
    d.model.to(device)
    d.model.load_state_dict(d.weights, strict=True)
    for n, p in d.model.named_parameters():
        p.requires_grad_(d.requires_grad[n])
    d.model.train(d.training)
    return set(dict(d.model.named_modules())) == set(d.modules)
