"""What a rank allocation adds to the compression time: the same model compressed at one
``param_ratio`` with ``allocation=uniform`` and with each strategy, side by side in one process
(``lrsweep.schedule.compress``, exactly what a job runs and times as ``compress_seconds``; the
calibration statistics are read from the disk cache first, so they are not part of either time).

    python benchmarks/allocation_cost.py model=smollm2 method=svdllm calib.n_samples=32 param_ratio=0.6 \\
        --strategies spectrum,fisher

The fresh model of each run is loaded before its clock starts. ``extra`` is (strategy's time -
uniform's) / uniform's; the allocation's own breakdown (spectra, Fisher pass, knapsack, check and,
of it, check_forward: the two forward passes over the held-out samples) comes from its row info.
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
from lrsweep.compress import method_spec
from lrsweep.context import Context
from lrsweep.provenance import model_key


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (model=smollm2 method=svdllm param_ratio=0.6 ...)")
    p.add_argument("--strategies", default="spectrum,fisher")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "device=cpu", *args.overrides])
    model, tokenizer = models.load(cfg.model, "cpu", str(cfg.cache_dir))
    ctx = Context(cfg, tokenizer, "cpu", str(cfg.cache_dir), model_key(cfg))
    needs = method_spec(cfg.method).needs
    if needs:  # into the disk cache, outside both clocks
        calib.layer_stats(model, models.target_modules(model, cfg.model.targets), ctx, needs)
    rows, base = [], None
    for strategy in ["uniform", *args.strategies.split(",")]:
        c = cfg.copy()
        with open_dict(c):
            c.allocation = strategy
        model, _ = models.load(cfg.model, "cpu", str(cfg.cache_dir))
        layers = models.target_modules(model, cfg.model.targets)
        t0 = time.perf_counter()
        _, info = schedule.compress(model, layers, Context(c, tokenizer, "cpu", str(cfg.cache_dir), ctx.model_key),
                                    progress=False)
        seconds = time.perf_counter() - t0
        base = base or seconds
        alloc = info.get("allocation", {})
        stop = f", {alloc['check_stopped']}" if alloc.get("check_stopped") else ""
        check = f" ({alloc['check_samples']} held-out samples{stop})" if alloc else ""
        rows.append([strategy, round(seconds, 1), f"{(seconds - base) / base:+.1%}", alloc.get("shipped", "") + check,
                     " ".join(f"{k} {v:.1f}" for k, v in alloc.get("seconds", {}).items())])
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    print(tabulate(rows, headers=["allocation", "compress s", "extra", "ships", "allocation's seconds"]))


if __name__ == "__main__":
    main()
