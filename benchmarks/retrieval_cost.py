"""Seconds per grid point of the encoder evaluation with and without ``eval.retrieval`` (warm cache).

    python benchmarks/retrieval_cost.py [--queries 250,500,1000] [--repeats 3]

MiniLM compressed by svd at rank 64 (all encoder layers); for each number of queries (0: retrieval
off, the probe alone), the dense work is prepared once (read from the cache after its first run), then
the probe task's ``evaluate`` of the compressed model is timed ``--repeats`` rounds, each round every
number of queries in turn (A/B alternating, as the VM's speed drifts): the median, the runs, the
tokens embedded per point (the probe's test texts, the queries, the documents) and the load average
at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from lrsweep import evaluate, models, provenance
from lrsweep.compress import compress_model

CONF = Path(__file__).resolve().parent.parent / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", default="250,500,1000")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    counts = [0, *(int(n) for n in args.queries.split(","))]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfgs = {n: compose("config", overrides=["logger=none", "method=svd", "rank=64", f"eval.retrieval.queries={n}"])
                for n in counts}
    cache_dir = os.environ.get("LRSWEEP_CACHE", str(Path.home() / ".cache" / "lrsweep"))
    dense, tok = models.load(cfgs[0].model, "cpu", cache_dir)
    model = copy.deepcopy(dense)
    compress_model(model, models.target_modules(model, cfgs[0].model.targets), cfgs[0], progress=False)
    prepared = {}
    for n, cfg in cfgs.items():
        ctx = evaluate.Context(cfg, tok, "cpu", cache_dir, provenance.model_key(cfg))
        prepared[n] = (ctx, evaluate.task_for(cfg).prepare(dense, ctx))
    runs: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.repeats):
        for n, (ctx, state) in prepared.items():
            t0 = time.perf_counter()
            evaluate.task_for(ctx.cfg).evaluate(model, ctx, state)
            runs[n].append(time.perf_counter() - t0)
    for n, ts in runs.items():
        state = prepared[n][1]
        parts = {"probe": state["test_batches"], **{k: state["retrieval"][k] for k in ("queries", "documents")
                                                    if state["retrieval"]}}
        tokens = ", ".join(f"{k} {sum(int(b['attention_mask'].sum()) for b in v.batches)}" for k, v in parts.items())
        print(f"queries={n}: {statistics.median(ts):.2f} s per point (runs {', '.join(f'{t:.2f}' for t in ts)}; "
              f"tokens: {tokens})")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
