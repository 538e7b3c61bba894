"""The knapsack over per-layer ranks: the ranks maximizing the summed gain within a total cost."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

EXACT_CELLS = 20_000_000  # exact DP up to this many (rank option x budget unit) cells


@dataclass
class Choice:
    """One layer's options: ranks lo..hi, cost[k] of rank lo + k, gain[k] of the step lo + k -> lo + k + 1."""

    lo: int
    cost: np.ndarray  # (hi - lo + 1,) integer
    gain: np.ndarray  # (hi - lo,) float, the value added by each step

    @property
    def hi(self) -> int:
        return self.lo + len(self.cost) - 1


def knapsack(choices: list[Choice], cap: int) -> tuple[list[int], str]:
    """Ranks maximizing the summed gain with total cost <= cap; (ranks, solver).

    Exact dynamic programming over cost in units of the costs' gcd when that table is small,
    otherwise greedy by gain per unit of cost (optimal when the gains per cost decrease and
    all steps have one cost; within one step's gain of the optimum in general).
    """
    base = sum(int(c.cost[0]) for c in choices)
    if base > cap:
        raise ValueError(f"the lowest ranks cost {base} > {cap}")
    g = reduce(math.gcd, (int(v) for c in choices for v in c.cost), 0) or 1
    units = cap // g
    if sum(len(c.cost) for c in choices) * (units + 1) <= EXACT_CELLS:
        return _exact(choices, units, g), "exact"
    return _greedy(choices, cap), "greedy"


def _exact(choices: list[Choice], units: int, g: int) -> list[int]:
    best = np.zeros(units + 1)
    picks = []
    for c in choices:
        values = np.concatenate([[0.0], np.cumsum(c.gain)])
        new = np.full(units + 1, -np.inf)
        pick = np.zeros(units + 1, dtype=np.int64)
        for k, cost in enumerate(c.cost // g):
            cost = int(cost)
            if cost > units:
                break
            cand = np.full(units + 1, -np.inf)
            cand[cost:] = best[:units + 1 - cost] + values[k]
            better = cand > new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append(pick)
    b = int(np.argmax(best))
    ranks = []
    for c, pick in zip(reversed(choices), reversed(picks), strict=True):
        k = int(pick[b])
        ranks.append(c.lo + k)
        b -= int(c.cost[k] // g)
    return ranks[::-1]


def _greedy(choices: list[Choice], cap: int) -> list[int]:
    steps = [0] * len(choices)
    spent = sum(int(c.cost[0]) for c in choices)

    def push(heap, i):
        c, k = choices[i], steps[i]
        if k < len(c.gain):
            delta = int(c.cost[k + 1] - c.cost[k])
            heapq.heappush(heap, (-c.gain[k] / max(delta, 1), i, delta))

    heap: list = []
    for i in range(len(choices)):
        push(heap, i)
    while heap:
        _, i, delta = heapq.heappop(heap)
        if spent + delta > cap:
            continue  # this layer's next step does not fit: it stays where it is
        spent += delta
        steps[i] += 1
        push(heap, i)
    return [c.lo + k for c, k in zip(choices, steps, strict=True)]
