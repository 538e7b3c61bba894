"""gptq's output error next to llm-compressor's GPTQ on real SmolLM2 layers and calibration statistics.

llm-compressor must not enter lrsweep's environment (it pins transformers <= 5.17): install it in a
throwaway venv that sees our packages, and point this script at lrsweep's caches:

    python -m venv --system-site-packages /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor==0.14.0.1
    python -m lrsweep model=smollm2 method=gptq bits=4 calib.n_samples=32 ...   # fills the calib cache
    PYTHONPATH=$PWD /tmp/llmc/bin/python benchmarks/gptq_parity.py <calib .safetensors> <model.safetensors>

Both run at the same bits, group size (64: SmolLM2 widths 576 and 1536 are not multiples of 128; symmetric int), damping (0.01) and
no act-order; output error = tr(D H D^T) / tr(W H W^T) with H = X^T X of the calibration tokens.
llm-compressor takes its group scales once from W (observer: absmax / 7.5 at 4 bits); ours are
absmax / 7 of the updated weights when a group starts (``lrsweep.methods.gptq``). The last column
compares ours with llm-compressor's GPTQ run on our grid (absmax / 7 of W, fp16 scales): the algorithm
alone.
"""

from __future__ import annotations

import sys

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


def theirs(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, damp: float, our_grid: bool = False) -> torch.Tensor:
    """llm-compressor's GPTQ with its observer's scales, or (``our_grid``) with quantize()'s scales of W."""
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    Wg = W.reshape(W.shape[0], -1, group)
    scale, zero = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)
    if our_grid:
        scale = quantize(W, bits, "group", group).meta["scale"].float()
    Q, _, fallback = quantize_weight(W[None].clone(), H[None].float().clone(), scale[None], zero[None], None, args,
                                     128, damp)
    assert not bool(fallback.any())
    return Q[0]


def main(calib_path: str, model_path: str, bits: int = 4, group: int = 64, damp: float = 0.01) -> None:
    rows = []
    with safe_open(calib_path, "pt") as c, safe_open(model_path, "pt") as m:
        for name in LAYERS:
            prefix, _, leaf = name.rpartition(".")
            H = c.get_tensor(f"{prefix}.{XTX_OF.get(leaf, leaf)}:xtx").double()
            W = m.get_tensor(f"{name}.weight").float()
            total = output_error(W, H)
            ours, _, _ = gptq_quantize(W, H, bits, "group", group, damp, act_order=False)
            errs = {k: output_error(W - v, H) / total for k, v in (
                ("rtn", quantize(W, bits, "group", group).value), ("lrsweep gptq", ours.value),
                ("llm-compressor gptq", theirs(W, H, bits, group, damp)),
                ("llm-compressor gptq, our grid", theirs(W, H, bits, group, damp, our_grid=True)))}
            rows.append([name, f"{W.shape[0]}x{W.shape[1]}", *errs.values(),
                         100 * (errs["lrsweep gptq"] / errs["llm-compressor gptq, our grid"] - 1)])
    print(f"# output error tr(D H D^T)/tr(W H W^T) at {bits} bits, group {group}, damp {damp}, no act-order")
    print(tabulate(rows, headers=["layer", "shape", "rtn", "lrsweep gptq", "llm-compressor gptq",
                                  "llm-compressor gptq, our grid", "ours vs theirs (same grid) %"],
                   floatfmt=("", "", ".5f", ".5f", ".5f", ".5f", "+.1f"), tablefmt="github"))


if __name__ == "__main__":
    main(*sys.argv[1:3], *(int(a) for a in sys.argv[3:4]))
