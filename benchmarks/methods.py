"""Time and relative error of every method on LLaMA-7B-shaped matrices, next to torch.linalg.svd
and the two-GEMM floor (W @ S and Q^T @ W, the matrix products any rank-r method must do).

    python benchmarks/methods.py                     # 4096x4096 and 11008x4096 at r=256
    python benchmarks/methods.py --quick             # 1024x1024 and 2752x1024 at r=64 (CPU: ~1-2 min)
    python benchmarks/methods.py --shapes 2048x2048 --rank 128 --methods svd,rsvd,lplr --device cuda

The weights are synthetic with a power-law spectrum (sigma_i ~ i^-0.5, like trained
projections); data-aware methods get statistics of N = 2 d synthetic inputs with uneven
channel scales, computed outside the timed region. Times are the fastest of ``--repeats`` runs
(more for fast methods; after one warm-up on CUDA); ``x floor`` = time / two-GEMM time,
``svd/x`` = torch.linalg.svd time / time,
``out err`` = ||(W - W_hat) X^T|| / ||W X^T|| on the synthetic inputs (when a data-aware method ran);
``err +%`` = relative error above the Eckart-Young optimum of rank r (data-aware methods
minimize the output error instead, so they sit above it by design; losparse stores more).
Methods that quantize W itself (quant, gptq, and the Q of lqer / caldera: W ~ Q + L R, whose
storage at rank 0 is not zero) get Q at ``--q-bits`` (default 4, absmax groups of 128) and their factors at their own
defaults (lqer fp16, caldera 4 bits); they store far more than rank r, so they sit below the optimum.

    python benchmarks/methods.py --quick --methods quant,gptq,lqer,caldera
    python benchmarks/methods.py --quick --methods quant,gptq,lqer,caldera --grid narrow   # the grid before
    python benchmarks/methods.py --quick --methods quant,gptq,lqer,caldera --observer mse

``--grid`` and ``--observer`` go to every method (lrsweep.quant: the symmetric grid's scale rule and
how scales are chosen); without ``--grid`` each method runs on its own default (``auto``; ``best``
for gptq, lqer and caldera).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tabulate import tabulate

from lrsweep.methods import REGISTRY, LayerStats
from lrsweep.quant import GRIDS, OBSERVERS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, budget_s: float = 2.0, most: int = 20):
    """(fastest seconds, result) of at least ``repeats`` runs, more (up to ``most``) while they take
    under ``budget_s`` in all; one untimed warm-up run first on CUDA (kernels, workspaces).
    The minimum, not the median: on a shared machine the other load only ever adds time."""
    out = fn() if device.type == "cuda" else None
    times: list[float] = []
    while len(times) < repeats or (sum(times) < budget_s and len(times) < most):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), out


def weight(n: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    k = min(n, d)
    s = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -0.5
    A = torch.randn(n, k, generator=g, device=device) / n**0.5
    B = torch.randn(k, d, generator=g, device=device) / d**0.5
    return (A * s) @ B


def statistics_for(n: int, d: int, device: torch.device, seed: int = 1) -> LayerStats:
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(2 * d, d, generator=g, device=device) * torch.rand(d, generator=g, device=device).add(0.1)
    F = torch.rand(n, d, generator=g, device=device) * torch.rand(n, 1, generator=g, device=device)
    stats = LayerStats(xtx=(X.T @ X).double(), absmean=X.abs().mean(0).double(), fisher=F, n_tokens=2 * d)
    return stats


def stores_q(spec, n: int, d: int) -> bool:
    """Whether the method quantizes W itself (no rank, or storage at rank 0): ``bits`` are Q's bits."""
    return not spec.has_rank or spec.storage_bits(n, d, 0, 4) > 0


def bench_shape(n: int, d: int, rank: int, bits: int, methods: list[str], device: torch.device,
                repeats: int, q_bits: int = 4, quantizer: dict | None = None) -> list[list]:
    W = weight(n, d, device)
    norm = float(torch.linalg.norm(W))
    stats = statistics_for(n, d, device) if any(REGISTRY[m].needs for m in methods) else None
    S = torch.randn(d, rank, device=device)
    Q = torch.linalg.qr(torch.randn(n, rank, device=device)).Q
    t_gemm1, _ = timed(lambda: W @ S, device, repeats)
    t_gemm2, _ = timed(lambda: Q.T @ W, device, repeats)
    floor = t_gemm1 + t_gemm2
    t_svd, (U, sv, Vh) = timed(lambda: torch.linalg.svd(W, full_matrices=False), device, max(1, repeats // 2))
    optimum = float(sv[rank:].square().sum().sqrt()) / norm
    shape = f"{n}x{d}"
    H = stats.xtx.float() if stats is not None else None

    def out_err(W_hat: torch.Tensor) -> float | None:  # ||(W - W_hat) X^T|| / ||W X^T|| on the synthetic inputs
        D = W - W_hat
        return None if H is None else float(((D @ H) * D).sum() / ((W @ H) * W).sum()) ** 0.5

    rows = [[shape, "two GEMMs (floor)", floor, 1.0, t_svd / floor, None, None, None],
            [shape, "torch.linalg.svd (full)", t_svd, t_svd / floor, 1.0, optimum, 0.0,
             out_err((U[:, :rank] * sv[:rank]) @ Vh[:rank])]]
    for name in methods:
        spec = REGISTRY[name]
        b, opts = (q_bits, {"scheme": "group"}) if stores_q(spec, n, d) else (bits, {})  # Q: groups of 128
        opts = {**opts, **(quantizer or {})}

        def call(spec=spec, b=b, opts=opts):  # the loop's values, bound now
            return spec.fn(W, rank=rank, bits=b, seed=0, stats=stats, **opts)

        t, f = timed(call, device, repeats)
        err = float(torch.linalg.norm(W - f.reconstruct())) / norm
        label = name + (f" [{f.info['solver']}]" if "solver" in f.info else "") + \
            (f" [Q {b} bits, {f.bits_per_weight:.2f} bits/weight]" if stores_q(spec, n, d) else "")
        extra = 100 * (err / optimum - 1) if spec.has_rank and name != "kronecker" else None
        rows.append([shape, label, t, t / floor, t_svd / t, err, extra, out_err(f.reconstruct())])
        print(f"  {shape} {label}: {t:.4f} s, rel err {err:.4f}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1024x1024 and 2752x1024 at r=64")
    p.add_argument("--shapes", help="comma-separated NxD (default: 4096x4096,11008x4096)")
    p.add_argument("--rank", type=int, help="default 256 (64 with --quick)")
    p.add_argument("--bits", type=int, default=32, help="bits of the factors (default 32: unquantized)")
    p.add_argument("--q-bits", type=int, default=4, help="bits of Q for methods that quantize W itself (default 4)")
    p.add_argument("--methods", default=",".join(sorted(m for m in REGISTRY if REGISTRY[m].has_rank)),
                   help="comma-separated (default: every method with a rank)")
    p.add_argument("--grid", choices=GRIDS,
                   help="the symmetric grid's scale rule (default: each method's own, auto or gptq's best)")
    p.add_argument("--observer", default="absmax", choices=OBSERVERS, help="how scales are chosen (default absmax)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, help="timed runs per method at least (default 3; 1 with --quick)")
    args = p.parse_args(argv)
    shapes = args.shapes or ("1024x1024,2752x1024" if args.quick else "4096x4096,11008x4096")
    rank = args.rank or (64 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {', '.join(sorted(REGISTRY))}")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for s in shapes.split(","):
        n, d = (int(v) for v in s.lower().split("x"))
        rows += bench_shape(n, d, rank, args.bits, methods, device, repeats, args.q_bits,
                            {"observer": args.observer, **({"grid": args.grid} if args.grid else {})})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# methods at rank {rank}, bits {args.bits}, grid {args.grid or 'of each method'}, "
          f"observer {args.observer}, on {name}, "
          f"torch {torch.__version__}, fastest of >= {repeats} runs")
    print(tabulate(rows, headers=["shape", "method", "seconds", "x floor", "svd/x", "rel err", "err +%", "out err"],
                   floatfmt=("", "", ".4f", ".2f", ".1f", ".4f", ".2f", ".4f"), tablefmt="github", missingval="-"))


if __name__ == "__main__":
    main()
