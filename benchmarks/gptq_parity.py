"""gptq's output error next to llm-compressor's GPTQ on real SmolLM2 layers and calibration statistics,
and the quantizer's grid rules and observers (``lrsweep.quant``) on the same layers.

llm-compressor must not enter lrsweep's environment (it pins transformers <= 5.17): install it in a
throwaway venv that sees our packages, and point this script at lrsweep's caches:

    python3.11 -m venv /tmp/llmc && echo "$PWD/.venv/lib/python3.11/site-packages" \\
        > /tmp/llmc/lib/python3.11/site-packages/lrsweep-venv.pth && /tmp/llmc/bin/pip install llmcompressor==0.14.0.1
    python -m lrsweep model=smollm2 method=gptq bits=4 calib.n_samples=32 ...   # fills the calib cache
    PYTHONPATH=$PWD /tmp/llmc/bin/python benchmarks/gptq_parity.py <calib .safetensors> <model.safetensors> \
        [bits] [group] [repeats]

Both run at the same bits, group size (default 64: SmolLM2 widths 576 and 1536 are not multiples of
128; symmetric int), damping (0.01) and no act-order. Seconds are the least of ``repeats`` runs
(default 1). Two tables:

- weight error ||W - Q||_F / ||W||_F of round-to-nearest: lrsweep's grid before #34 (``narrow``:
  absmax / (2^(b-1) - 1)), llm-compressor's observer (absmax / (2^(b-1) - 0.5), what ``full``
  computes), quantize()'s default (``auto``), ``best`` (per group the better of full and tight) and
  ``auto`` with the ``mse`` observer; the ratios to ``narrow``;
- output error tr(D H D^T) / tr(W H W^T) (H = X^T X of the calibration tokens) of gptq on grid
  ``auto`` (its default before ``best``), on its default (``best``: per group as it starts, the better
  of full and tight in output error), with the mse observer (searched on the output error, the
  default ``scale_error``) and with mse searched on the plain squared error (``scale_error=weight``,
  what GPTQ's and llm-compressor's mse do); of llm-compressor's default GPTQ (its observer takes the
  group scales once from W), and of llm-compressor's GPTQ run on our ``auto`` grid's scales of W (the
  algorithm alone: its column "ours vs theirs"); seconds of gptq auto, best and best with mse.
"""

from __future__ import annotations

import sys
import time

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from safetensors import safe_open
from tabulate import tabulate

from lrsweep.methods.gptq import gptq_quantize, output_error
from lrsweep.quant import quantize

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.o_proj", "model.layers.15.mlp.up_proj",
          "model.layers.20.mlp.down_proj", "model.layers.29.self_attn.v_proj"]
XTX_OF = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # layers sharing their input


def theirs(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, damp: float,
           our_grid: bool = False) -> torch.Tensor:
    """llm-compressor's GPTQ with its observer's scales, or (``our_grid``) with quantize()'s default (auto) scales
    of W."""
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    Wg = W.reshape(W.shape[0], -1, group)
    scale, zero = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)
    if our_grid:
        scale = quantize(W, bits, "group", group).meta["scale"].float()
    Q, _, fallback = quantize_weight(W[None].clone(), H[None].float().clone(), scale[None], zero[None], None, args,
                                     128, damp)
    assert not bool(fallback.any())
    return Q[0]


def their_rtn(W: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest on llm-compressor's default observer's grid (its scales, clamped to its code range)."""
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    Wg = W.reshape(W.shape[0], -1, group)
    scale, _ = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)
    s = scale.unsqueeze(-1).float()
    return (torch.clamp(torch.round(Wg / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s).reshape(W.shape)


def timed(fn, repeats: int = 1):
    """(fn(), the least seconds of ``repeats`` calls)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(calib_path: str, model_path: str, bits: int = 4, group: int = 64, repeats: int = 1,
         damp: float = 0.01) -> None:
    wrows, orows = [], []
    with safe_open(calib_path, "pt") as c, safe_open(model_path, "pt") as m:
        for name in LAYERS:
            prefix, _, leaf = name.rpartition(".")
            H = c.get_tensor(f"{prefix}.{XTX_OF.get(leaf, leaf)}:xtx").double()
            W = m.get_tensor(f"{name}.weight").float()
            norm, total = float(W.norm()), output_error(W, H)
            rtn = {"narrow": quantize(W, bits, "group", group, grid="narrow").value,
                   "llm-compressor": their_rtn(W, bits, group)}
            rtn["auto"], t_rtn = timed(lambda W=W: quantize(W, bits, "group", group).value, repeats)
            rtn["best"], t_rtn_best = timed(lambda W=W: quantize(W, bits, "group", group, grid="best").value, repeats)
            rtn["auto, mse"], t_rtn_mse = timed(lambda W=W: quantize(W, bits, "group", group, observer="mse").value,
                                                repeats)
            werr = {k: float((W - v).norm()) / norm for k, v in rtn.items()}
            ratios = [werr[k] / werr["narrow"] for k in ("llm-compressor", "auto", "best", "auto, mse")]
            wrows.append([name, f"{W.shape[0]}x{W.shape[1]}", *werr.values(), *ratios, t_rtn, t_rtn_best, t_rtn_mse])

            def ours(grid: str, observer: str = "absmax", scale_error: str = "output", W=W, H=H) -> torch.Tensor:
                return gptq_quantize(W, H, bits, "group", group, damp, act_order=False, grid=grid, observer=observer,
                                     scale_error=scale_error)[0].value

            auto, t_auto = timed(lambda: ours("auto"), repeats)
            best, t_best = timed(lambda: ours("best"), repeats)
            mse, t_mse = timed(lambda: ours("best", "mse"), repeats)
            errs = {k: output_error(W - v, H) / total for k, v in (
                ("auto", auto), ("best", best), ("best, mse", mse),
                ("best, mse, weight", ours("best", "mse", "weight")),
                ("llmc", theirs(W, H, bits, group, damp)), ("llmc, our grid", theirs(W, H, bits, group, damp, True)))}
            orows.append([name, f"{W.shape[0]}x{W.shape[1]}", *errs.values(),
                          *(errs[k] / errs["llmc"] for k in ("auto", "best", "best, mse", "best, mse, weight")),
                          errs["best, mse"] / errs["best"], 100 * (errs["auto"] / errs["llmc, our grid"] - 1),
                          t_auto, t_best, t_mse])
    print(f"# round-to-nearest weight error ||W - Q|| / ||W|| at {bits} bits, group {group}")
    print(tabulate(wrows, headers=["layer", "shape", "narrow (before #34)", "llm-compressor", "auto (default)", "best",
                                   "auto, mse", "llmc / narrow", "auto / narrow", "best / narrow", "mse / narrow",
                                   "s auto", "s best", "s mse"],
                   floatfmt=("", "", ".5f", ".5f", ".5f", ".5f", ".5f", ".3f", ".3f", ".3f", ".3f", ".3f", ".3f",
                             ".3f"),
                   tablefmt="github"))
    print(f"\n# gptq output error tr(D H D^T)/tr(W H W^T) at {bits} bits, group {group}, damp {damp}, no act-order")
    print(tabulate(orows, headers=["layer", "shape", "gptq auto", "gptq best (default)", "gptq best, mse",
                                   "gptq best, mse on weight error", "llm-compressor gptq",
                                   "llm-compressor gptq, our auto grid", "auto / llmc", "best / llmc", "mse / llmc",
                                   "mse on weight error / llmc", "mse / best", "ours vs theirs (auto grid) %",
                                   "s auto", "s best", "s mse"],
                   floatfmt=("", "", ".5f", ".5f", ".5f", ".5f", ".5f", ".5f", ".3f", ".3f", ".3f", ".3f", ".3f",
                             "+.1f",
                             ".2f", ".2f", ".2f"), tablefmt="github"))


if __name__ == "__main__":
    main(*sys.argv[1:3], *(int(a) for a in sys.argv[3:6]))
