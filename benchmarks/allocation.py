"""Rank allocation against uniform at equal parameters: perplexity (causal LMs) or the probe's
accuracy (encoders), and the seconds each allocation took.

    python benchmarks/allocation.py model=smollm2 calib.n_samples=32 eval.ppl_tokens=2048 \\
        --methods svdllm,svd --ratios 0.8,0.6,0.4
    python benchmarks/allocation.py model=minilm --methods svdllm,svd --ratios 0.8,0.6,0.4

One process per model: the model, its calibration statistics, the spectra (one SVD per layer in
the method's metric) and the sensitivity passes (cached on disk, shared by every ratio) are
computed once per method. Each (ratio, strategy) is scored with every layer set to its truncation
in the method's metric: for svd and svdllm exactly the method's rank-r result, without the
rounding of the factors to fp16 (bits=16), which moves perplexity by far less than the differences
shown. ``ships`` is what the held-out check chose (the candidate, or uniform when the candidate's
held-out calibration loss is not lower by more than two standard errors (allocate.CHECK_Z) of the paired per-sample
differences); the metric is given for the candidate itself.
``compress s`` is the method's own time on the first block's layers, scaled to all layers.
``alloc s`` is the allocation's time including reading every layer's spectrum through the method
(its SVD, kept by ``svd.reuse`` so the compression that follows truncates it instead of
decomposing again); ``beyond the SVDs s`` leaves that out: the allocation's real extra cost
(sensitivity passes or the Fisher pass, knapsack, held-out check).
"""

from __future__ import annotations

import argparse
import logging
import time

from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from tabulate import tabulate

import hydra_plugins.lrsweep_launcher.launcher  # noqa: F401  (registers the launcher configs compose reads)
from lrsweep import allocate, calib, evaluate, models, tying
from lrsweep.compress import layer_seed, method_options, method_spec, resolve_rank
from lrsweep.provenance import model_key
from lrsweep.methods import svd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (model=smollm2 calib.n_samples=32 ...)")
    p.add_argument("--methods", default="svdllm,svd")
    p.add_argument("--ratios", default="0.8,0.6,0.4")
    p.add_argument("--strategies", default="spectrum,sensitivity,fisher")
    p.add_argument("--sensitivity-samples", type=int, default=None,
                   help="calibration windows per sensitivity pass (default: allocate.SENSITIVITY_SAMPLES)")
    args = p.parse_args()
    if args.sensitivity_samples:
        allocate.SENSITIVITY_SAMPLES.update(dict.fromkeys(allocate.SENSITIVITY_SAMPLES,
                                                          args.sensitivity_samples))
    logging.basicConfig(level=logging.WARNING)
    from pathlib import Path

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    rows = []
    for method in args.methods.split(","):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("config", overrides=["logger=none", f"method={method}", "+calib=default"
                                               if method in ("svd", "lplr", "lsvd", "dsvd") else "device=cpu",
                                               *args.overrides])
        model, tokenizer = models.load(cfg.model, "cpu", str(cfg.cache_dir))
        ctx = evaluate.Context(cfg, tokenizer, "cpu", str(cfg.cache_dir), model_key(cfg))
        task = evaluate.task_for(cfg)
        state = task.prepare(model, ctx)
        layers = models.target_modules(model, cfg.model.targets)
        spec, opts = method_spec(cfg.method), method_options(cfg.method)
        stats = calib.layer_stats(model, layers, ctx, spec.needs)[0] if spec.needs else None
        leaders = list(tying.groups(model, layers))
        block = [n for n in leaders if n.startswith(next(iter(models.blocks(layers))) + ".")]
        t0 = time.perf_counter()
        for n in block:
            spec.fn(layers[n].weight.detach(), rank=64, bits=int(cfg.bits), stats=(stats or {}).get(n), **opts)
        compress_s = (time.perf_counter() - t0) * len(leaders) / len(block)
        spectra: dict = {}
        scope = svd.reuse()  # the SVDs read here are the ones a real compression then truncates
        scope.__enter__()
        t0 = time.perf_counter()
        for i, n in enumerate(leaders):
            W, st = layers[n].weight.detach(), (stats or {}).get(n)
            spectra[n] = allocate.method_spectrum(W, spec, st, opts, int(cfg.bits), layer_seed(cfg.seed, i)) \
                or allocate.spectrum(W, spec, st, opts)
        spectra_s = time.perf_counter() - t0
        for ratio in [float(r) for r in args.ratios.split(",")]:
            uniform = {n: resolve_rank(spec, *layers[n].weight.shape, None, cfg.bits, None, opts, ratio)
                       for n in leaders}
            with allocate.Swap(layers, {n: spectra[n].approx(uniform[n]) for n in leaders}):
                base = task.evaluate(model, ctx, state)
            metric = "perplexity" if "perplexity" in base else "accuracy"
            rows.append([method, ratio, "uniform", "", base[metric], "", round(spectra_s, 1), 0.0,
                         round(compress_s, 1)])
            print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
            for strategy in args.strategies.split(","):
                c = cfg.copy()
                with open_dict(c):
                    c.param_ratio, c.allocation = ratio, strategy
                ctx.cfg = c
                t0 = time.perf_counter()
                _, info = allocate.allocate(model, layers, ctx, stats, spectra=spectra)
                seconds = time.perf_counter() - t0
                ranks = info["candidate_ranks"]
                kept = sum(spec.params(*layers[n].weight.shape, r, **opts) for n, r in ranks.items())
                kept_u = sum(spec.params(*layers[n].weight.shape, r, **opts) for n, r in uniform.items())
                with allocate.Swap(layers, {n: spectra[n].approx(ranks[n]) for n in leaders}):
                    out = task.evaluate(model, ctx, state)
                stop = f", {info['check_stopped']}" if info["check_stopped"] else ""
                check = (f"{info['loss_candidate']:.4f} vs {info['loss_uniform']:.4f} "
                         f"(se {info['loss_difference_se']:.4f}, {info['check_samples']} samples{stop})")
                rows.append([method, ratio, strategy, info["shipped"], out[metric], f"{kept / kept_u:.4f}",
                             round(spectra_s + seconds, 1), round(seconds, 1), round(compress_s, 1), check])
                print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
            ctx.cfg = cfg
        scope.__exit__(None, None, None)
    print(tabulate(rows, headers=["method", "param_ratio", "allocation", "ships", metric,
                                  "params / uniform's", "alloc s", "beyond the SVDs s", "compress s",
                                  "held-out loss cand vs unif"]))


if __name__ == "__main__":
    main()
