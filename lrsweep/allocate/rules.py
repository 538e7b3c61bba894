"""Allocation strategies that set each layer's rank by a closed rule over the layers' spectra (no knapsack);
:mod:`lrsweep.allocate` calls them through :data:`RULES` and checks their ranks against uniform as any other.

svdllm_v2  SVD-LLM V2's heterogeneous ratios (Wang et al., NAACL 2025). The matrices of one type (the
           same name once the block index is removed, and the same shape) form a group of N. Each
           one's theoretical truncation loss at its uniform rank u, L_i = sqrt(Σ_{j>u} σ_j²) with σ the
           spectrum the method truncates (whitened for xtx methods: then L_i is exactly the output
           error ||(W - W') X^T||_F), sets its removed fraction
               c_i = N · c · w_i / Σ_j w_j,   w_i = 1 / log(1 + L_i),
           c = 1 - u / F the group's uniform removed fraction and F the break-even rank (the rank that
           stores as much as the dense matrix); rank r_i = floor(F (1 - c_i)), kept in [1, min(limit, F)],
           then lowered one at a time (the most kept first) until the group stores no more than uniform.
           A matrix that loses more keeps more. The paper writes log(L_i): log(1 + L) is the same for
           L >> 1 and stays positive when a loss is below 1.
"""

from __future__ import annotations

import math
from typing import Any

from lrsweep import methods
from lrsweep.methods import MethodSpec
from lrsweep.models import layer_type


def svdllm_v2(spec: MethodSpec, shapes: dict[str, tuple[int, int]], uniform: dict[str, int], spectra: dict[str, Any],
              cost: Any, opts: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """(ranks, info) of SVD-LLM V2's rule; ``cost(name, rank)`` is what a layer spends of the budget."""
    groups: dict[tuple, list[str]] = {}
    for name, shape in shapes.items():
        groups.setdefault((layer_type(name), shape), []).append(name)
    ranks, losses = {}, {}
    for (_, (n, d)), names in groups.items():
        full = max(1, methods.rank_for_param_ratio(spec, n, d, 1.0, **opts)) if spec.params is not None \
            else spec.rank_limit(n, d, **opts)
        top = min(spec.rank_limit(n, d, **opts), full)
        for name in names:
            losses[name] = math.sqrt(max(float(spectra[name].tail()[min(uniform[name], len(spectra[name].S))]), 0.0))
        w = {name: 1.0 / math.log1p(max(losses[name], 1e-300)) for name in names}
        total_w = sum(w.values())
        for name in names:
            c = 1.0 - uniform[name] / full
            ci = len(names) * c * w[name] / total_w
            ranks[name] = min(top, max(1, math.floor(full * (1.0 - ci))))
        cap = sum(cost(name, uniform[name]) for name in names)
        while sum(cost(name, ranks[name]) for name in names) > cap:
            name = max((nm for nm in names if ranks[nm] > 1), key=lambda nm: (ranks[nm], nm))
            ranks[name] -= 1
    return ranks, {"groups": len(groups), "truncation_loss": losses}


RULES = {"svdllm_v2": svdllm_v2}
