"""Rank allocation under one global budget: ``allocation=uniform|spectrum|sensitivity|fisher``.

``uniform`` gives every layer the rank its own share of ``budget`` / ``param_ratio`` allows (the
rule of :func:`lrsweep.compress.resolve_rank`). The other strategies treat the budget as one
constraint over all target layers: the stored cost (bits, quantizer metadata included, with
``budget``; parameters with ``param_ratio``) summed over layers must stay within what the uniform
allocation stores (so results compare at equal or fewer bits), and each layer's rank stays in
``[max(1, LOW * u), min(HIGH * u, limit, break-even)]`` around its uniform rank u.

Both rank the same per-layer spectrum: the singular values σ_i of the matrix the method truncates
(its error metric): W·C with X^T X = C C^T for methods using ``xtx`` (svdllm, drone: dropping σ_i
costs exactly σ_i² of output error ‖(W - Ŵ) X^T‖²), W·diag(absmean^alpha) for ``absmean`` (asvd),
diag(sqrt(Σ_j F_ij))·W for ``fisher`` (fwsvd), and W itself otherwise (svd, lplr, lsvd, dsvd,
plugins). Adding rank i to a layer gains

  spectrum     σ_i² / ‖M‖_F², the error removed as a fraction of the layer's dense output energy;
  sensitivity  (σ_i² / ‖M‖_F²) · ΔL_b / Σ_{l in b} ê_l(r_ref): the measured calibration-loss increase ΔL_b
               when the unit b alone (a block, ``GRANULARITY``; or one layer) is truncated to its
               layers' reference ranks r_ref (their ``param_ratio=REFERENCE_RATIO`` ranks), shared by
               its layers in proportion to their normalized spectral error there
               (ê(r) = Σ_{i>r} σ_i² / ‖M‖_F²). One forward pass per unit on ``SENSITIVITY_SAMPLES``
               calibration windows, cached under the calibration key and shared by every budget.

:func:`knapsack` then maximizes the total gain within the budget (exact DP when small, greedy on
gain per unit cost otherwise). A candidate is checked before use: the calibration loss of the
model with every layer truncated in its metric, on ``CHECK_SAMPLES`` windows drawn with
``calib.seed + 1`` (not the ones that chose it), for the candidate ranks and for the uniform ones;
the uniform allocation ships unless the candidate's mean per-sample loss is lower by more than
``CHECK_Z`` = 2 standard errors of the paired differences (a one-sided test at about 2%: at one
standard error, MiniLM shipped two candidates with 3 and 5 points less test accuracy), and the row
records both. A causal LM's 16 windows come in ``CHECK_LOOKS`` = 2 looks of 8: after the first the
check stops when the candidate's loss is not lower (futility) or lower by more than ``CHECK_STOP_Z``
= 3 standard errors (efficacy, Haybittle-Peto's interim bound), so a clear verdict costs half the
forward passes. For encoders the check's probe is fitted on dense embeddings of other held-out texts
than those it scores, as the evaluation's probe is (in-sample, a lower probe loss once shipped a
candidate with 4.6 points less test accuracy).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import time
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import methods
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.methods import LayerStats, MethodSpec
from lrsweep.methods import svd as _svd
from lrsweep.ratio_rules import RULES

log = logging.getLogger(__name__)

STRATEGIES = ("uniform", "spectrum", "sensitivity", "fisher", "svdllm_v2")  # svdllm_v2: lrsweep.ratio_rules
LOW, HIGH = 0.5, 2.0  # each layer's rank stays within [LOW, HIGH] x its uniform rank
REFERENCE_RATIO = 0.5  # sensitivity: each unit alone truncated to its layers' param_ratio=0.5 ranks
GRANULARITY = "block"  # sensitivity unit: "block" (one pass per block) or "layer" (one per layer, 7x on LLaMA)
# calibration windows (causal LMs, calib.seq_len tokens) or labelled texts (encoders: the probe needs both
# classes) of a sensitivity pass, and of the held-out check (drawn with seed calib.seed + 1) against uniform;
# encoders draw twice as many for the check: the probe is fitted on the first half, scored on the second
SENSITIVITY_SAMPLES = {"causal_lm": 2, "encoder": 64}
CHECK_SAMPLES = {"causal_lm": 16, "encoder": 256}  # 16 windows: the standard error of 4 was itself noise
CHECK_Z = 2.0  # the candidate ships when its held-out loss is lower by more than CHECK_Z standard errors
# causal LMs: the check's windows come in CHECK_LOOKS equal batches; after each but the last it stops when
# the candidate's loss is not lower (futility) or lower by more than CHECK_STOP_Z standard errors (efficacy)
CHECK_LOOKS = {"causal_lm": 2, "encoder": 1}
CHECK_STOP_Z = 3.0
EXACT_CELLS = 20_000_000  # knapsack: exact DP up to this many (rank option x budget unit) cells
VERSION = 1


# ---------------------------------------------------------------- costs and the global budget
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
    return ("param_ratio", float(cfg.param_ratio)) if cfg.get("param_ratio") is not None \
        else ("budget", float(cfg.budget))


def check(cfg: DictConfig, spec: MethodSpec, opts: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> None:
    """ConfigError (before launch) for an allocation that cannot run."""
    strategy = cfg.get("allocation", "uniform")
    if strategy not in STRATEGIES:
        raise ConfigError("allocation", f"{strategy!r} is unknown", list(STRATEGIES))
    if strategy == "uniform":
        return
    if cfg.budget is None and cfg.get("param_ratio") is None:
        raise ConfigError("allocation", f"{strategy} shares one global budget across layers; set it",
                          ["budget=<bits per weight>", "param_ratio=<fraction kept>"])
    if not spec.has_rank or spec.rank_rule is not None:
        raise ConfigError("allocation", f"method {spec.name} has no free per-layer rank to allocate", ["uniform"])
    if cfg.get("param_ratio") is not None and spec.params is None:
        return  # resolve_rank names this error
    if not cfg.get("calib"):
        raise ConfigError("calib", f"allocation={strategy} checks its ranks on held-out calibration batches, "
                          "but no calibration data is configured", ["+calib=default"])
    if cfg.calib.get("sequential", False):
        raise ConfigError("allocation", f"{strategy} fixes all ranks before the first block is compressed; "
                          "calib.sequential=true takes later statistics from the compressed model",
                          ["uniform", "calib.sequential=false"])
    if cfg.get("stream", False) and spec.needs:
        raise ConfigError("allocation", f"{strategy} needs every layer's {list(spec.needs)} before the first "
                          "block is compressed, which stream=true never holds", ["uniform", "stream=false"])
    key, value = budget_value(cfg)
    low = minimum_cost(spec, shapes, cfg, opts)
    if value < low:
        raise ConfigError(key, f"{value} is below every layer's rank-1 cost: the minimum is {low:.4g}"
                          f" ({'bits per weight' if key == 'budget' else 'of the parameters'})")


# ---------------------------------------------------------------- the knapsack
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
    for c, pick in zip(reversed(choices), reversed(picks)):
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
    return [c.lo + k for c, k in zip(choices, steps)]


# ---------------------------------------------------------------- spectra in the method's metric
@dataclass
class Spectrum:
    """A layer's singular values in the method's error metric and its weight at any rank."""

    S: torch.Tensor  # fp64, descending
    approx: Callable[[int], torch.Tensor]  # rank -> the layer's (reconstructed) weight at that rank
    source: str  # "method": the method's own SVD (and output); "metric": computed here (no reusable SVD)
    U: torch.Tensor | None = None  # left singular vectors (columns) of the truncated matrix
    Vh: torch.Tensor | None = None  # right singular vectors (rows)
    forget: Callable[[int], None] = lambda r: None  # drop the method's result at rank r kept by approx(r)

    def tail(self) -> np.ndarray:
        """e[r] = Σ_{i>r} σ_i² for r = 0..len(S)."""
        s2 = (self.S ** 2).cpu().numpy()
        return np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])


def method_spectrum(W: torch.Tensor, spec: MethodSpec, stats: LayerStats | None, opts: dict[str, Any],
                    bits: int, seed: int) -> Spectrum | None:
    """The spectrum the method itself truncates, read by running it once at rank 1 inside an active
    :func:`lrsweep.methods.svd.reuse` scope (which keeps its full SVD for the real compression);
    ``approx(r)`` is the method's own result at rank r (quantization included), reusing that SVD; the
    result is kept in the scope, so the compression at the rank that ships does not run the method again.
    None when the method decomposes no matrix through ``truncated_svd`` (randomized or iterative ones)."""
    from lrsweep.compress import factorization_key, factorize

    scope = _svd.active()
    scope["last"] = None
    spec.fn(W, rank=1, bits=bits, seed=seed, stats=stats, **opts)
    if scope["last"] is None:
        return None
    U, S, Vh, _ = scope["svds"][scope["last"]]

    def approx(r: int) -> torch.Tensor:
        return factorize(spec, W, opts, r, bits, seed, stats, share=True).reconstruct()

    def forget(r: int) -> None:
        _svd.forget("factorizations", factorization_key(spec, W, opts, r, bits, seed, stats))

    return Spectrum(S.detach().double().cpu(), approx, "method", U, Vh, forget)


def spectrum(W: torch.Tensor, spec: MethodSpec, stats: LayerStats | None, opts: dict[str, Any],
             factors: dict | None = None) -> Spectrum:
    """The singular values of the matrix the method truncates, computed here (methods whose own
    decomposition :func:`method_spectrum` cannot read): M = diag(left) W B; the weight at rank r is
    the rank-r truncation of M mapped back. ``factors`` shares one Cholesky factor among layers
    reading the same input (q/k/v, gate/up share their X^T X)."""
    from lrsweep.methods.fwsvd import importance
    from lrsweep.methods.svdllm import cholesky_shifted

    W = W.detach().double()
    left = right = None
    if "xtx" in spec.needs:
        factors = {} if factors is None else factors
        if id(stats.xtx) not in factors:
            factors[id(stats.xtx)] = cholesky_shifted(stats.xtx.to(W.device), float(opts.get("shift", 1e-6)))[0]
        right = factors[id(stats.xtx)]
        M = W @ right
    elif "absmean" in spec.needs:
        s = stats.absmean.to(W.device).double().clamp_min(0) ** float(opts.get("alpha", 0.5))
        right = s.clamp_min(1e-6 * s.max())
        M = W * right
    elif "fisher" in spec.needs:
        side = str(opts.get("side", "output"))
        w = importance(stats.fisher.to(W.device), side, float(opts.get("power", 0.5)), float(opts.get("eps", 1e-6)))
        if side == "output":
            left = w
            M = W * left[:, None]
        else:
            right = w
            M = W * right
    else:
        M = W
    U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    left = None if left is None else left.float()
    right = None if right is None else (right.float() if right.dim() == 1 else right)

    def approx(r: int) -> torch.Tensor:
        A = (U[:, :r] * S[:r]) @ Vh[:r]
        if right is not None:
            A = A / right if right.dim() == 1 else \
                torch.linalg.solve_triangular(right, A.double(), upper=False, left=False).to(A.dtype)
        return A / left[:, None] if left is not None else A

    return Spectrum(S.double(), approx, "metric", U, Vh)


# ---------------------------------------------------------------- losses with truncated layers
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
    return float(np.mean([float(loss_fn(model, b).float().mean()) for b in batches]))


def calibration_batches(cfg: DictConfig, tokenizer: Any, seed: int, samples: int, device: str,
                        batch_size: int | None = None) -> list[dict]:
    """``samples`` calibration windows/texts drawn with ``seed`` (in one batch unless ``batch_size``)."""
    from lrsweep.calib import SOURCES, to_device

    c = OmegaConf.create(OmegaConf.to_container(cfg.calib, resolve=True))
    c.seed, c.n_samples, c.batch_size = int(seed), int(samples), int(batch_size or samples)
    return [to_device(b, device) for b in SOURCES[cfg.model.kind].batches(c, tokenizer)]


def units(names: list[str]) -> dict[str, list[str]]:
    """What one sensitivity pass truncates together: a block (``GRANULARITY="block"``) or one layer."""
    from lrsweep.schedule import blocks

    if GRANULARITY == "layer":
        return {n: [n] for n in names}
    return {b: list(group) for b, group in blocks(dict.fromkeys(names)).items()}


def sensitivity(model, layers, spectra, ref_ranks, ctx, loss_fn, batches) -> tuple[dict[str, float], dict]:
    """Each unit's (block's or layer's) calibration-loss increase alone at its layers' reference ranks
    (cached on disk); the result is per unit name."""
    from lrsweep import cache
    from lrsweep.calib import stats_key
    from lrsweep.compress import method_options

    cfg = ctx.cfg
    key = {"version": VERSION, "calib": stats_key(cfg, ctx.model_key, ()), "method": str(cfg.method.name),
           "options": method_options(cfg.method), "bits": int(cfg.bits), "reference": ref_ranks,
           "samples": list(batches[0]["input_ids"].shape), "granularity": GRANULARITY}
    groups = units(list(ref_ranks))

    def compute():
        base = mean_loss(model, batches, loss_fn)
        out = []
        for names in groups.values():
            with Swap(layers, {n: spectra[n].approx(ref_ranks[n]) for n in names}):
                out.append(mean_loss(model, batches, loss_fn) - base)
        return {"delta": torch.tensor(out, dtype=torch.float64)}, {"base": base}

    t0 = time.perf_counter()
    tensors, info, hit = cache.get_or_compute(ctx.cache_dir, "sensitivity", key, compute)
    delta = dict(zip(groups, tensors["delta"].tolist()))
    return delta, {"cache_hit": hit, "seconds": round(time.perf_counter() - t0, 3), "passes": len(groups),
                   "granularity": GRANULARITY, "base_loss": info["base"], "delta": delta}


@torch.enable_grad()
def output_fisher(model, layers, names, ctx, loss_fn, batches) -> tuple[dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor], dict]:
    """Per layer, G_k = Σ_t (∂L/∂y_tk)² over the calibration tokens t (the diagonal of K-FAC's output
    factor: the gradient of the summed per-sample losses w.r.t. the layer's output y) and m_j = Σ_t x_tj²
    (its input's second moments), from one forward and backward pass per batch; cached on disk
    under the calibration key."""
    from lrsweep import cache
    from lrsweep.calib import stats_key
    from lrsweep.calib.stats import grads_only

    key = {"version": VERSION, "calib": stats_key(ctx.cfg, ctx.model_key, ()), "layers": list(names),
           "samples": [list(b["input_ids"].shape) for b in batches]}

    def compute():
        if bad := [n for n in names if not isinstance(layers[n], nn.Linear)]:
            raise ValueError(f"allocation=fisher weighs output channels of Linear layers; {bad[0]} is "
                             f"{type(layers[bad[0]]).__name__} (leave it out of model.targets)")
        G = {n: torch.zeros(layers[n].weight.shape[0], dtype=torch.float64) for n in names}
        m = {n: torch.zeros(layers[n].weight.shape[1], dtype=torch.float64) for n in names}

        def hook(name):
            def fn(module, args, output):
                x = args[0]
                if x.is_floating_point():
                    m[name] += x.detach().double().reshape(-1, x.shape[-1]).pow(2).sum(0).cpu()
                if output.requires_grad:
                    output.register_hook(lambda g: add(name, g))
            return fn

        def add(name, g) -> None:  # a tensor hook returning None leaves the gradient as it is
            G[name] += g.detach().double().reshape(-1, g.shape[-1]).pow(2).sum(0).cpu()

        handles = [layers[n].register_forward_hook(hook(n)) for n in names]
        try:
            with grads_only(model, [layers[n].weight for n in names]):
                for b in batches:
                    loss_fn(model, b).sum().backward()
                    for n in names:
                        layers[n].weight.grad = None
        finally:
            for h in handles:
                h.remove()
        tensors = {f"G.{n}": G[n] for n in names} | {f"m.{n}": m[n] for n in names}
        return tensors, {"tokens": sum(int(b["input_ids"].shape[0] * b["input_ids"].shape[1]) for b in batches)}

    t0 = time.perf_counter()
    tensors, info, hit = cache.get_or_compute(ctx.cache_dir, "output_fisher", key, compute)
    return ({n: tensors[f"G.{n}"] for n in names}, {n: tensors[f"m.{n}"] for n in names},
            {"cache_hit": hit, "seconds": round(time.perf_counter() - t0, 3), "tokens": info["tokens"],
             "samples": sum(int(b["input_ids"].shape[0]) for b in batches)})


def fisher_gains(spectra: dict[str, Spectrum], G: dict[str, torch.Tensor], m: dict[str, torch.Tensor],
                 whitened: bool) -> dict[str, np.ndarray]:
    """Each singular component's estimated loss increase when dropped, in one scale for all layers:
    ½ E[(g·Δy)²] with Δy = u_i σ_i (v_iᵀ x), under K-FAC's independence of g and x and the diagonals
    of both factors: σ_i² · (Σ_k G_k u_ik²) · (Σ_j m_j v_ij²), up to one factor common to all layers
    (1/(2·tokens)), which the knapsack ignores. For methods whitening the
    inputs (svdllm, drone: X^T X = C C^T, v_i in the whitened space) the input factor Σ_t (v_iᵀ C⁻¹ x_t)²
    is exactly 1 for every component. For metrics scaling W (asvd, fwsvd) the vectors are those of
    the scaled matrix: an approximation."""
    out = {}
    for n, sp in spectra.items():
        if sp.U is None or sp.U.shape[0] != G[n].shape[0]:
            raise ValueError(f"allocation=fisher needs {n}'s spectrum in its output space; the method's "
                             f"decomposition has {None if sp.U is None else sp.U.shape[0]} rows, the layer "
                             f"{G[n].shape[0]} outputs")
        k = len(sp.S)
        out_w = (sp.U[:, :k].double().cpu() ** 2 * G[n][:, None]).sum(0)
        in_w = torch.ones(k, dtype=torch.float64) if whitened or sp.Vh.shape[1] != m[n].shape[0] \
            else (sp.Vh[:k].double().cpu() ** 2 * m[n][None, :]).sum(1)
        out[n] = ((sp.S.cpu() ** 2) * out_w * in_w).numpy()
    return out


# ---------------------------------------------------------------- the strategy
def gains(strategy: str, spectra: dict[str, Spectrum], delta: dict[str, float] | None,
          ref_ranks: dict[str, int] | None) -> dict[str, np.ndarray]:
    """Per layer, the value of each singular value (index i: adding rank i + 1)."""
    out = {name: (sp.S ** 2).cpu().numpy() / max(float((sp.S ** 2).sum()), 1e-300) for name, sp in spectra.items()}
    if strategy == "spectrum":
        return out
    for unit, names in units(list(spectra)).items():
        # the unit's measured loss increase, shared by its layers as their normalized errors at r_ref
        errs = sum(float(out[n][ref_ranks[n]:].sum()) for n in names)
        for n in names:
            out[n] = out[n] * max(delta[unit], 0.0) / max(errs, 1e-300)
    return out


def choose(spec: MethodSpec, shapes: dict[str, tuple[int, int]], uniform: dict[str, int],
           value: dict[str, np.ndarray], cfg: DictConfig, opts: dict[str, Any]) -> tuple[dict[str, int], dict]:
    """Knapsack over ranks within [LOW, HIGH] x uniform, at most the uniform allocation's cost."""
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
    return dict(zip(shapes, ranks)), {"solver": solver, "cap": cap}


@dataclass
class Check:
    """The held-out check of a candidate allocation against uniform, per held-out sample."""

    loss_uniform: float
    loss_candidate: float
    se: float  # standard error of the mean paired difference (candidate - uniform); 0 with one sample
    samples: int
    forward_s: float = 0.0  # seconds of the two forward passes over the held-out samples
    stopped: str = ""  # "futility" / "efficacy": decided at an interim look, before all the samples

    @classmethod
    def of(cls, uniform: np.ndarray, candidate: np.ndarray, forward_s: float) -> Check:
        d = candidate - uniform
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        return cls(float(uniform.mean()), float(candidate.mean()), se, len(d), forward_s)

    @property
    def better(self) -> bool:
        """Lower by more than CHECK_Z standard errors of the paired difference: a candidate whose
        gain is within the noise of the held-out samples does not ship."""
        return self.loss_candidate - self.loss_uniform + CHECK_Z * self.se < 0

    def interim(self) -> str:
        """At a look before the last: stop for futility (the candidate's loss is not lower: it would
        need a gain of over CHECK_Z se from the samples left) or efficacy (lower by over CHECK_STOP_Z
        se, Haybittle-Peto's bound, which leaves the final CHECK_Z test's error rate about as it is);
        "" goes on."""
        if self.loss_candidate >= self.loss_uniform:
            return "futility"
        return "efficacy" if self.loss_candidate - self.loss_uniform + CHECK_STOP_Z * self.se < 0 else ""


@torch.no_grad()
def sample_losses(model: nn.Module, batches: list[dict], loss_fn) -> np.ndarray:
    """Each held-out sample's loss (a loss_fn returning one value per batch counts as one sample)."""
    return np.concatenate([np.atleast_1d(loss_fn(model, b).float().cpu().numpy()) for b in batches])


def against_uniform(model: nn.Module, layers: dict[str, nn.Module], spectra: dict[str, Spectrum],
                    uniform: dict[str, int], ranks: dict[str, int], batches: list[dict], loss_fn
                    ) -> tuple[dict[str, int], Check]:
    """(the ranks that ship, the check): the candidate only when its held-out loss is lower than
    uniform's by more than CHECK_Z standard errors of the paired per-sample difference. Each batch is
    a look: both rank sets on it, then (before the last) :meth:`Check.interim` may decide early."""
    losses: tuple[list, list] = ([], [])
    forward = 0.0
    for i, batch in enumerate(batches):
        for rs, out in zip((uniform, ranks), losses):
            with Swap(layers, {n: spectra[n].approx(r) for n, r in rs.items()}):
                t0 = time.perf_counter()
                out.append(sample_losses(model, [batch], loss_fn))
                forward += time.perf_counter() - t0
        check = Check.of(*(np.concatenate(x) for x in losses), forward)
        if i < len(batches) - 1 and (stop := check.interim()):
            check.stopped = stop
            break
    return (ranks if check.better else uniform), check


def scope(cfg: DictConfig) -> contextlib.AbstractContextManager:
    """Wrap allocation and compression: a non-uniform allocation reads every layer's SVD through the
    method, and the compression at the chosen ranks truncates the same decompositions (svd.reuse)."""
    return _svd.reuse() if cfg.get("allocation", "uniform") != "uniform" else contextlib.nullcontext()


def allocate(model: nn.Module, layers: dict[str, nn.Module], ctx: Context, stats: dict[str, LayerStats] | None,
             spectra: dict[str, Spectrum] | None = None) -> tuple[dict[str, int] | None, dict[str, Any]]:
    """(ranks per leader layer, info for the row) for ``cfg.allocation``; ranks None for uniform.

    ``spectra``: a dict filled on the first call and reused by later ones (benchmarks sweeping budgets).
    """
    from lrsweep import tying
    from lrsweep.compress import layer_seed, method_options, method_spec, resolve_rank

    cfg = ctx.cfg
    strategy = cfg.get("allocation", "uniform")
    if strategy == "uniform":
        return None, {}
    t_all = time.perf_counter()
    spec, opts = method_spec(cfg.method), method_options(cfg.method)
    leaders = list(tying.groups(model, layers))
    shapes = {n: tuple(layers[n].weight.shape) for n in leaders}
    uniform = {n: resolve_rank(spec, *shapes[n], cfg.rank, cfg.bits, cfg.budget, opts, cfg.get("param_ratio"))
               for n in leaders}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    factors: dict = {}
    spectra = {} if spectra is None else spectra
    order = {name: i for i, name in enumerate(layers)}  # the seeds compress_model gives each layer
    with contextlib.ExitStack() as stack:
        if not _svd._SCOPES:  # called on its own (benchmarks): the method's SVDs live as long as this call
            stack.enter_context(_svd.reuse())
        for n in leaders:
            if n not in spectra:
                W, st = layers[n].weight.detach(), (stats or {}).get(n)
                spectra[n] = method_spectrum(W, spec, st, opts, int(cfg.bits), layer_seed(cfg.seed, order[n])) \
                    or spectrum(W, spec, st, opts, factors)
        seconds["spectra"] = time.perf_counter() - t0
        info, final = _choose_and_check(model, layers, ctx, strategy, spec, opts, shapes, uniform, spectra, seconds)
    seconds["total"] = time.perf_counter() - t_all
    info["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return final, info


def _choose_and_check(model, layers, ctx, strategy, spec, opts, shapes, uniform, spectra, seconds):
    """The candidate ranks for ``strategy`` and the held-out check against uniform: (row info, ranks that ship)."""
    from lrsweep.calib import SOURCES

    cfg = ctx.cfg
    leaders = list(shapes)
    source = SOURCES[cfg.model.kind]
    device = str(next(model.parameters()).device)
    n_check = CHECK_SAMPLES[cfg.model.kind]
    if source.fitted:  # the probe is fitted on dense embeddings of other texts than those it scores
        fit_batches, check_batches = ([b] for b in calibration_batches(
            cfg, ctx.tokenizer, int(cfg.calib.seed) + 1, 2 * n_check, device, n_check))
    else:
        check_batches = fit_batches = calibration_batches(cfg, ctx.tokenizer, int(cfg.calib.seed) + 1, n_check,
                                                          device, n_check // CHECK_LOOKS[cfg.model.kind])
    info: dict[str, Any] = {"strategy": strategy}
    delta = ref = None
    if strategy == "sensitivity":
        chosen = calibration_batches(cfg, ctx.tokenizer, int(cfg.calib.seed),
                                     SENSITIVITY_SAMPLES[cfg.model.kind], device)
        loss_fn = source.loss(model, chosen, device)
        ref = {n: max(1, methods.rank_for_param_ratio(spec, *shapes[n], REFERENCE_RATIO, **opts))
               if spec.params is not None else uniform[n] for n in leaders}
        delta, info["sensitivity"] = sensitivity(model, layers, spectra, ref, ctx, loss_fn, chosen)
        seconds["sensitivity"] = info["sensitivity"]["seconds"]
    if strategy == "fisher":
        chosen = calibration_batches(cfg, ctx.tokenizer, int(cfg.calib.seed), int(cfg.calib.n_samples), device,
                                     int(cfg.calib.batch_size))
        G, m, info["fisher"] = output_fisher(model, layers, leaders, ctx, source.loss(model, chosen, device), chosen)
        seconds["fisher"] = info["fisher"]["seconds"]
        value = fisher_gains(spectra, G, m, whitened="xtx" in spec.needs)
    elif strategy not in RULES:
        value = gains(strategy, spectra, delta, ref)
    t0 = time.perf_counter()
    if strategy in RULES:  # a closed rule over the spectra (lrsweep.ratio_rules)
        ranks, info[strategy] = RULES[strategy](spec, shapes, uniform, spectra,
                                                lambda n, r: layer_cost(spec, *shapes[n], r, cfg, opts), opts)
    else:
        ranks, info["knapsack"] = choose(spec, shapes, uniform, value, cfg, opts)
    seconds["knapsack"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss_fn = source.loss(model, fit_batches, device)
    final, check = against_uniform(model, layers, spectra, uniform, ranks, check_batches, loss_fn)
    for n in leaders:  # the method's results kept for the ranks that do not ship
        for r in {uniform[n], ranks[n]} - {final[n]}:
            spectra[n].forget(r)
    seconds["check"] = time.perf_counter() - t0
    seconds["check_forward"] = check.forward_s  # of "check": the rest is the method at both rank sets
    shipped = strategy if final is ranks else "uniform"
    if shipped == "uniform":
        log.warning("allocation=%s: held-out calibration loss %.4f is not below uniform's %.4f by more than "
                    "%g standard errors (%.4f); the uniform ranks ship", strategy, check.loss_candidate,
                    check.loss_uniform, CHECK_Z, check.se)
    info.update(shipped=shipped, loss_uniform=check.loss_uniform, loss_candidate=check.loss_candidate,
                loss_difference_se=check.se, check_samples=check.samples, check_stopped=check.stopped,
                check_seed=int(cfg.calib.seed) + 1,
                check_fit_samples=n_check if source.fitted else 0, bounds=[LOW, HIGH],
                candidate_ranks=ranks, uniform_ranks=uniform,
                spectra={src: sum(sp.source == src for sp in spectra.values()) for src in ("method", "metric")})
    return info, final


def predicted_bits(spec: MethodSpec, shapes: dict[str, tuple[int, int]], ranks: dict[str, int], bits: int,
                   opts: dict[str, Any]) -> int | None:
    """Total stored bits the ranks should give, from the method's ``storage_bits`` (None without it)."""
    if spec.storage_bits is None:
        return None
    return sum(int(spec.storage_bits(*shapes[n], r, bits, **opts)) for n, r in ranks.items())


def record(row: Any, cfg: DictConfig, results: list, info: dict[str, Any] | None) -> None:
    """The row's allocation fields: strategy, what shipped, the check's losses, predicted bits."""
    from lrsweep.compress import method_options, method_spec

    spec = method_spec(cfg.method)
    row.allocation = str(cfg.get("allocation", "uniform"))
    row.extra["layer_shapes"] = {r.name: list(r.shape) for r in results}  # kept fractions (analysis --kind ranks)
    row.bits_predicted = predicted_bits(spec, {r.name: r.shape for r in results}, {r.name: r.rank for r in results},
                                        int(cfg.bits), method_options(cfg.method)) if spec.has_rank else None
    if info:
        row.allocation_shipped = info["shipped"]
        row.allocation_loss_uniform, row.allocation_loss = info["loss_uniform"], info["loss_candidate"]
        row.extra["allocation"] = info
