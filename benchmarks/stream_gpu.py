"""Streamed compression of a random-weight LLaMA-7B-shaped model: time per block and peak GPU memory.

    python benchmarks/stream_gpu.py --layers 4 --method svd --rank 1024
    python benchmarks/stream_gpu.py --layers 4 --method svdllm --rank 1024 --sequential

Runs one grid point through the real job path (``model=llama7b_random stream=true``): the model
waits on CPU, each block moves to the GPU, is compressed and moves back. Prints a table of
seconds and peak GPU memory per block and writes the row under ``--results``. On a machine
without CUDA it runs on CPU with reduced widths (``--small``) as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--method", default="svd")
    p.add_argument("--rank", type=int, default=1024)
    p.add_argument("--sequential", action="store_true", help="calib.sequential=true (data-aware methods)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--results", default="/tmp/stream_gpu")
    p.add_argument("--small", action="store_true", help="reduced widths (CPU smoke test)")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = p.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    import hydra_plugins.lrsweep_launcher.launcher  # noqa: F401  (registers launcher configs)
    from lrsweep import job

    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = ["model=llama7b_random", f"model.num_layers={args.layers}", f"model.dtype={args.dtype}",
                 "stream=true", f"device={device}", f"method={args.method}", f"rank={args.rank}",
                 f"results_dir={args.results}", "logger=none", "progress=false", "force=true",
                 "eval.ppl_tokens=2048", "eval.latency.repeats=5"]
    if args.sequential:
        overrides.append("calib.sequential=true")
    if args.small or device == "cpu":
        overrides += ["model.random_init.hidden_size=256", "model.random_init.intermediate_size=688",
                      "model.random_init.num_attention_heads=4", "model.random_init.num_key_value_heads=4",
                      f"rank={min(args.rank, 64)}"]
    os.environ.setdefault("LRSWEEP_CACHE", "/tmp/lrcache")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides + args.overrides)
    row = job.run(cfg)
    if row.status != "ok":
        print(json.dumps(row.error, indent=1))
        return 1
    stream = row.extra["stream"]
    print(f"\n{row.model} x{args.layers} blocks, {row.method} rank {row.rank}, {row.device} {row.gpu_name or ''}")
    print("| block | layers | seconds | s/layer | peak GPU MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, b in stream["blocks"].items():
        print(f"| {name} | {b['layers']} | {b['seconds']:.2f} | {b['seconds'] / b['layers']:.3f} | "
              f"{b.get('peak_mem_mb', float('nan')):.0f} |")
    print(f"peak GPU memory while compressing: {stream.get('peak_mem_mb', 'n/a')} MiB; "
          f"job peak: {row.peak_mem_mb:.0f} MiB; compress {row.compress_seconds:.1f} s; "
          f"perplexity {row.perplexity_dense:.1f} -> {row.perplexity:.1f} (random weights)")
    print(f"latency ms (median / p90): dense {row.latency_ms_dense:.2f} / {row.latency_ms_dense_p90:.2f}, "
          f"compressed {row.latency_ms:.2f} / {row.latency_ms_p90:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
