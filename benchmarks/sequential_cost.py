"""What carrying the block inputs saves a block-by-block compression (``calib.sequential=true``, or a
method that refits to the compressed predecessors' inputs such as ``method=svdllm method.update=true``):
the statistics of each block taken by one pass through the whole model per block (what
``lrsweep.schedule.sequential`` did before, and still does for the Fisher) against the inputs carried
from block to block (``schedule.Propagation``), side by side in one process on fresh copies of the model.

    python benchmarks/sequential_cost.py model=smollm2 method=svdllm param_ratio=0.8 calib.n_samples=16

Both compress with the same method and statistics; ``max rel err diff`` is the largest difference of
a layer's relative error between the two (the same statistics up to rounding give ~0).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from tabulate import tabulate

import hydra_plugins.lrsweep_launcher.launcher  # noqa: F401  (registers the launcher configs compose reads)
from lrsweep import calib, models, schedule
from lrsweep.compress import compress_model, method_spec
from lrsweep.context import Context
from lrsweep.provenance import model_key


def whole_model_passes(model, layers, ctx, needs):
    """Each block's statistics from a pass through the whole model, then the block compressed."""
    batches, loss_fn = calib.calibration(model, ctx, needs)
    results, seconds = [], 0.0
    for block in models.blocks(layers).values():
        t0 = time.perf_counter()
        stats = calib.collect(model, block, batches, needs, "cpu", loss_fn)
        seconds += time.perf_counter() - t0
        results += compress_model(model, block, ctx.cfg, stats=stats, progress=False)
    return results, seconds


def carried(model, layers, ctx, needs):
    """The same through the carried block inputs (schedule.Propagation)."""
    batches, _ = calib.calibration(model, ctx, needs)
    t0 = time.perf_counter()
    walk = schedule.Propagation(model, layers, batches, "cpu")
    results, seconds = [], time.perf_counter() - t0
    for name, block in models.blocks(layers).items():
        t0 = time.perf_counter()
        stats = walk.stats(model.get_submodule(name), block, needs)
        seconds += time.perf_counter() - t0
        results += compress_model(model, block, ctx.cfg, stats=stats, progress=False)
        t0 = time.perf_counter()
        walk.advance(model.get_submodule(name))
        seconds += time.perf_counter() - t0
    return results, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (model=smollm2 method=svdllm param_ratio=0.8 ...)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "device=cpu", *args.overrides])
    with open_dict(cfg):
        cfg.calib.sequential = True
    needs = method_spec(cfg.method).needs
    if not needs or "fisher" in needs:
        raise SystemExit("a method with input statistics (xtx, absmean) and no Fisher: method=svdllm, asvd, ...")
    rows, errs = [], []
    for name, fn in (("whole-model pass per block", whole_model_passes), ("carried block inputs", carried)):
        model, tokenizer = models.load(cfg.model, "cpu", str(cfg.cache_dir))
        layers = models.target_modules(model, cfg.model.targets)
        ctx = Context(cfg, tokenizer, "cpu", str(cfg.cache_dir), model_key(cfg))
        t0 = time.perf_counter()
        results, seconds = fn(model, layers, ctx, needs)
        rows.append([name, len(models.blocks(layers)), round(seconds, 1), round(time.perf_counter() - t0, 1)])
        errs.append({r.name: r.rel_err for r in results})
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    diff = max(abs(errs[0][n] - errs[1][n]) for n in errs[0])
    print(tabulate(rows, headers=["statistics", "blocks", "statistics s", "total s"]))
    print(f"statistics ratio (carried / whole): {rows[1][2] / rows[0][2]:.3f}; total ratio: "
          f"{rows[1][3] / rows[0][3]:.3f}; max rel err diff: {diff:.2e}")


if __name__ == "__main__":
    main()
