"""The global budget: what a layer's rank costs of it, and the ranks that fit it best.

With ``budget`` a rank costs the layer's stored bits (quantizer metadata included), with
``param_ratio`` its stored parameters, both from the method's registration (``storage_bits``,
``params``). A non-uniform allocation spends at most what the uniform one stores, and keeps each
layer's rank in ``[max(1, LOW * u), min(HIGH * u, limit, break-even)]`` around its uniform rank u.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lrsweep import methods
from lrsweep.allocate.solve import Choice, knapsack
from lrsweep.methods import MethodSpec

LOW, HIGH = 0.5, 2.0  # each layer's rank stays within [LOW, HIGH] x its uniform rank


def layer_cost(spec: MethodSpec, n: int, d: int, r: int, cfg: DictConfig, opts: dict[str, Any]) -> int:
    """What one layer at rank r spends of the budget: stored bits with ``budget``, else parameters."""
    if cfg.get("param_ratio") is not None:
        return int(spec.params(n, d, r, **opts))
    return int(spec.storage_bits(n, d, r, int(cfg.bits), **opts))


def minimum_cost(spec: MethodSpec, shapes: dict[str, tuple[int, int]], cfg: DictConfig,
                 opts: dict[str, Any]) -> float:
    """The budget (bits/weight or kept fraction) of every layer at rank 1."""
    total = sum(n * d for n, d in shapes.values())
    return sum(layer_cost(spec, n, d, 1, cfg, opts) for n, d in shapes.values()) / total


def budget_value(cfg: DictConfig) -> tuple[str, float]:
    """(the budget's key, its value): ``param_ratio`` when set, else ``budget``."""
    return ("param_ratio", float(cfg.param_ratio)) if cfg.get("param_ratio") is not None \
        else ("budget", float(cfg.budget))


def choose(spec: MethodSpec, shapes: dict[str, tuple[int, int]], uniform: dict[str, int],
           value: dict[str, np.ndarray], cfg: DictConfig, opts: dict[str, Any]) -> tuple[dict[str, int], dict]:
    """Knapsack over ranks within [LOW, HIGH] x uniform, at most the uniform allocation's cost;
    ``value[name][i]`` is what adding rank i + 1 gains."""
    choices = []
    cap = 0
    for name, (n, d) in shapes.items():
        u = uniform[name]
        limit = spec.rank_limit(n, d, **opts)
        if spec.params is not None:  # never at or above break-even
            limit = min(limit, max(methods.rank_for_param_ratio(spec, n, d, 1.0, **opts), u))
        lo, hi = max(1, min(u, math.floor(LOW * u))), max(u, min(limit, math.ceil(HIGH * u)))
        ranks = range(lo, hi + 1)
        cost = np.array([layer_cost(spec, n, d, r, cfg, opts) for r in ranks], dtype=np.int64)
        v = value[name]
        gain = np.array([v[r - 1] if r - 1 < len(v) else 0.0 for r in range(lo + 1, hi + 1)])
        choices.append(Choice(lo, cost, gain))
        cap += layer_cost(spec, n, d, u, cfg, opts)
    ranks, solver = knapsack(choices, cap)
    return dict(zip(shapes, ranks, strict=True)), {"solver": solver, "cap": cap}


def predicted_bits(spec: MethodSpec, shapes: dict[str, tuple[int, int]], ranks: dict[str, int], bits: int,
                   opts: dict[str, Any]) -> int | None:
    """Total stored bits the ranks should give, from the method's ``storage_bits`` (None without it)."""
    if spec.storage_bits is None:
        return None
    return sum(int(spec.storage_bits(*shapes[n], r, bits, **opts)) for n, r in ranks.items())
