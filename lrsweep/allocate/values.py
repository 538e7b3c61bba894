"""What adding each singular component to a layer is worth, per strategy.

  spectrum     σ_i² / ‖M‖_F², the error removed as a fraction of the layer's dense output energy;
  sensitivity  (σ_i² / ‖M‖_F²) · ΔL_b / Σ_{l in b} ê_l(r_ref): the measured calibration-loss increase ΔL_b
               when the unit b alone (a block, ``GRANULARITY``; or one layer) is truncated to its
               layers' reference ranks r_ref, shared by its layers in proportion to their normalized
               spectral error there (ê(r) = Σ_{i>r} σ_i² / ‖M‖_F²);
  fisher       σ_i² · (Σ_k G_k u_ik²) · (Σ_j m_j v_ij²): the component's estimated loss increase under
               K-FAC's diagonal factors (:func:`fisher_gains`).
The measured figures (ΔL_b; G and m) are cached on disk under the calibration key.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from lrsweep import cache
from lrsweep.allocate.losses import Swap, mean_loss
from lrsweep.allocate.spectra import Spectrum
from lrsweep.calib import stats_key
from lrsweep.calib.stats import grads_only
from lrsweep.compress import method_options
from lrsweep.models import blocks

GRANULARITY = "block"  # sensitivity unit: "block" (one pass per block) or "layer" (one per layer, 7x on LLaMA)
VERSION = 1  # of the cached sensitivity and Fisher figures


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


def units(names: list[str]) -> dict[str, list[str]]:
    """What one sensitivity pass truncates together: a block (``GRANULARITY="block"``) or one layer."""
    if GRANULARITY == "layer":
        return {n: [n] for n in names}
    return {b: list(group) for b, group in blocks(dict.fromkeys(names)).items()}


def sensitivity(model, layers, spectra, ref_ranks, ctx, loss_fn, batches) -> tuple[dict[str, float], dict]:
    """Each unit's (block's or layer's) calibration-loss increase alone at its layers' reference ranks
    (cached on disk); the result is per unit name. One forward pass per unit on ``batches``."""
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
    delta = dict(zip(groups, tensors["delta"].tolist(), strict=True))
    return delta, {"cache_hit": hit, "seconds": round(time.perf_counter() - t0, 3), "passes": len(groups),
                   "granularity": GRANULARITY, "base_loss": info["base"], "delta": delta}


@torch.enable_grad()
def output_fisher(model, layers, names, ctx, loss_fn, batches) -> tuple[dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor], dict]:
    """Per layer, G_k = Σ_t (∂L/∂y_tk)² over the calibration tokens t (the diagonal of K-FAC's output
    factor: the gradient of the summed per-sample losses w.r.t. the layer's output y) and m_j = Σ_t x_tj²
    (its input's second moments), from one forward and backward pass per batch; cached on disk
    under the calibration key."""
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
    (1/(2·tokens)), which the knapsack ignores. ``whitened`` (the method's metric whitens the inputs:
    X^T X = C C^T, v_i in the whitened space, :attr:`lrsweep.methods.Metric.whitened`): the input
    factor Σ_t (v_iᵀ C⁻¹ x_t)² is exactly 1 for every component. For metrics scaling W (asvd, fwsvd)
    the vectors are those of the scaled matrix: an approximation."""
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
