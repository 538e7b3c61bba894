"""Rank allocation under one global budget: ``allocation=uniform|spectrum|sensitivity|fisher``.

``uniform`` gives every layer the rank its own share of ``budget`` / ``param_ratio`` allows (the
rule of :func:`lrsweep.compress.resolve_rank`). The other strategies treat the budget as one
constraint over all target layers (:mod:`~lrsweep.allocate.budget`), in four steps:

1. each layer's spectrum in its method's error metric (:mod:`~lrsweep.allocate.spectra`);
2. what each singular component is worth under the strategy (:mod:`~lrsweep.allocate.values`);
3. the ranks maximizing the total value within the budget (:mod:`~lrsweep.allocate.budget`,
   :mod:`~lrsweep.allocate.solve`);
4. the held-out check of those ranks against the uniform ones, which decides what ships
   (:mod:`~lrsweep.allocate.heldout`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from omegaconf import DictConfig
from torch import nn

from lrsweep import methods, tying
from lrsweep.allocate.budget import HIGH, LOW, budget_value, choose, layer_cost, minimum_cost, predicted_bits
from lrsweep.allocate.heldout import CHECK_LOOKS, CHECK_SAMPLES, CHECK_STOP_Z, CHECK_Z, Check, against_uniform
from lrsweep.allocate.losses import Swap, calibration_batches, mean_loss, sample_losses
from lrsweep.allocate.rules import RULES
from lrsweep.allocate.solve import Choice, knapsack
from lrsweep.allocate.spectra import Spectrum, metric, method_spectrum, spectrum
from lrsweep.allocate.values import fisher_gains, gains, output_fisher, sensitivity, units
from lrsweep.calib import SOURCES
from lrsweep.compress import layer_seed, method_options, method_spec, resolve_rank
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.methods import LayerStats, MethodSpec
from lrsweep.methods import svd as _svd

log = logging.getLogger(__name__)

STRATEGIES = ("uniform", "spectrum", "sensitivity", "fisher", "svdllm_v2")  # svdllm_v2: allocate.rules
REFERENCE_RATIO = 0.5  # sensitivity: each unit alone truncated to its layers' param_ratio=0.5 ranks
# calibration windows (causal LMs, calib.seq_len tokens) or labelled texts (encoders: the probe needs both
# classes) of one sensitivity pass, drawn with calib.seed
SENSITIVITY_SAMPLES = {"causal_lm": 2, "encoder": 64}

__all__ = ["CHECK_LOOKS", "CHECK_SAMPLES", "CHECK_STOP_Z", "CHECK_Z", "HIGH", "LOW", "REFERENCE_RATIO",
           "SENSITIVITY_SAMPLES", "STRATEGIES", "Check", "Choice", "Spectrum", "Swap", "against_uniform", "allocate",
           "budget_value", "calibration_batches", "check", "choose", "fisher_gains", "gains", "knapsack", "layer_cost",
           "mean_loss", "method_spectrum", "minimum_cost", "output_fisher", "predicted_bits", "record", "sample_losses",
           "scope", "sensitivity", "spectrum", "units"]


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


def scope(cfg: DictConfig) -> contextlib.AbstractContextManager:
    """Wrap allocation and compression: a non-uniform allocation reads every layer's SVD through the
    method, and the compression at the chosen ranks truncates the same decompositions (svd.reuse)."""
    return _svd.reuse() if cfg.get("allocation", "uniform") != "uniform" else contextlib.nullcontext()


def allocate(model: nn.Module, layers: dict[str, nn.Module], ctx: Context, stats: dict[str, LayerStats] | None,
             spectra: dict[str, Spectrum] | None = None) -> tuple[dict[str, int] | None, dict[str, Any]]:
    """(ranks per leader layer, info for the row) for ``cfg.allocation``; ranks None for uniform.

    ``spectra``: a dict filled on the first call and reused by later ones (benchmarks sweeping budgets).
    """
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
    spectra = {} if spectra is None else spectra
    order = {name: i for i, name in enumerate(layers)}  # the seeds compress_model gives each layer
    with contextlib.ExitStack() as stack:
        if not _svd.in_scope():  # called on its own (benchmarks): the method's SVDs live as long as this call
            stack.enter_context(_svd.reuse())
        for n in leaders:
            if n not in spectra:
                W, st = layers[n].weight.detach(), (stats or {}).get(n)
                spectra[n] = method_spectrum(W, spec, st, opts, int(cfg.bits), layer_seed(cfg.seed, order[n])) \
                    or spectrum(W, spec, st, opts)
        seconds["spectra"] = time.perf_counter() - t0
        first = leaders[0]  # whether the metric whitens the inputs depends on the method, not the layer
        whitened = strategy == "fisher" and bool(leaders) and \
            metric(layers[first].weight.detach(), spec, (stats or {}).get(first), opts).whitened
        info, final = _choose_and_check(model, layers, ctx, strategy, spec, opts, shapes, uniform, spectra,
                                        whitened, seconds)
    seconds["total"] = time.perf_counter() - t_all
    info["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return final, info


def _choose_and_check(model, layers, ctx, strategy, spec, opts, shapes, uniform, spectra, whitened, seconds):
    """The candidate ranks for ``strategy`` and the held-out check against uniform: (row info, ranks that ship)."""
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
        value = fisher_gains(spectra, G, m, whitened)
    elif strategy not in RULES:
        value = gains(strategy, spectra, delta, ref)
    t0 = time.perf_counter()
    if strategy in RULES:  # a closed rule over the spectra (allocate.rules)
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


def record(row: Any, cfg: DictConfig, results: list, info: dict[str, Any] | None) -> None:
    """The row's allocation fields: strategy, what shipped, the check's losses, predicted bits."""
    spec = method_spec(cfg.method)
    row.allocation = str(cfg.get("allocation", "uniform"))
    row.extra["layer_shapes"] = {r.name: list(r.shape) for r in results}  # kept fractions (analysis --kind ranks)
    row.bits_predicted = predicted_bits(spec, {r.name: r.shape for r in results}, {r.name: r.rank for r in results},
                                        int(cfg.bits), method_options(cfg.method)) if spec.has_rank else None
    if info:
        row.allocation_shipped = info["shipped"]
        row.allocation_loss_uniform, row.allocation_loss = info["loss_uniform"], info["loss_candidate"]
        row.extra["allocation"] = info
