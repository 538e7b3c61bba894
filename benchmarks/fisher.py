"""Cost of the two Fisher estimators (calib.fisher=sample | batch) on the real models at the default
calibration size, side by side: wall and CPU seconds (all threads; the honest figure on a shared machine)
of the collection pass (batches and loss built outside the timing).

    python benchmarks/fisher.py                                # minilm and smollm2, default calib
    python benchmarks/fisher.py --models smollm2 calib.n_samples=16   # extra args are Hydra overrides

Per batch both do one forward and one backward; ``sample`` adds, per target Linear, the product
G_b = g_bᵀ x_b for each sample and its square (the weight gradient autograd computes anyway is the
sum of the G_b). ``agree`` is the cosine between the two estimators' row weights √Σ_j F_ij, averaged over layers.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from hydra import compose, initialize_config_dir
from tabulate import tabulate

import hydra_plugins.lrsweep_launcher.launcher  # noqa: F401  (registered before Hydra scans plugins, as tests/conftest.py does)
from lrsweep import calib, models

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")


def measure(model_name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}", "method=fwsvd", "logger=none", *overrides])
    model, tok = models.load(cfg.model, "cpu", cfg.cache_dir)
    layers = calib.linears(models.target_modules(model, cfg.model.targets))
    source = calib.SOURCES[cfg.model.kind]
    batches = source.batches(cfg.calib, tok)
    loss_fn = source.loss(model, batches, "cpu")
    out: dict = {"model": model_name, "layers": len(layers), "samples": int(cfg.calib.n_samples),
                 "seq_len": int(cfg.calib.seq_len), "batch": int(cfg.calib.batch_size)}
    fishers = {}
    for est in ("batch", "sample"):
        t0, c0 = time.perf_counter(), time.process_time()
        fishers[est] = calib.collect(model, layers, batches, ("fisher",), "cpu", loss_fn, est)
        out[f"{est} s"] = round(time.perf_counter() - t0, 1)
        out[f"{est} cpu s"] = round(time.process_time() - c0, 1)
    out["sample/batch (cpu)"] = round(out["sample cpu s"] / out["batch cpu s"], 2)
    cos = [torch.nn.functional.cosine_similarity(fishers["batch"][n].fisher.double().sum(1).sqrt(),
                                                 fishers["sample"][n].fisher.double().sum(1).sqrt(), dim=0)
           for n in layers]
    out["agree"] = round(float(torch.stack(cos).mean()), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. calib.n_samples=16")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("LRSWEEP_THREADS", torch.get_num_threads())))
    rows = [measure(m, args.overrides) for m in args.models.split(",")]
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    main()
