"""Round-to-nearest squared weight error of the symmetric grid's rules (``lrsweep.quant``: narrow, full,
tight) per bit width and group size on SmolLM2's five parity layers: the measurement behind ``grid: auto``.

    python benchmarks/grid_rules.py <model.safetensors>     # e.g. the converted SmolLM2 in lrsweep's cache

Prints narrow's error / each rule's error (> 1: the rule is better than the grid before), the range
over the five layers, and the rule with the least total error; ``auto`` is full up to
``lrsweep.quant.AUTO_FULL_BITS`` bits and tight above.
"""

from __future__ import annotations

import sys

from safetensors import safe_open
from tabulate import tabulate

from lrsweep.quant import grid_rule, quantize

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.o_proj", "model.layers.15.mlp.up_proj",
          "model.layers.20.mlp.down_proj", "model.layers.29.self_attn.v_proj"]


def main(model_path: str) -> None:
    with safe_open(model_path, "pt") as m:
        weights = [m.get_tensor(f"{name}.weight").float() for name in LAYERS]
    rows = []
    for scheme, group in (("group", 32), ("group", 64), ("group", 128), ("channel", 0)):
        for bits in range(2, 9):
            err = {g: [float((quantize(W, bits, scheme, group or 128, grid=g).value - W).square().sum())
                       for W in weights]
                   for g in ("narrow", "full", "tight")}
            ratio = {g: [n / e for n, e in zip(err["narrow"], err[g], strict=True)] for g in ("full", "tight")}
            best = min(err, key=lambda g: sum(err[g]))
            rows.append([group or "channel", bits, *(f"{min(r):.3f}-{max(r):.3f}" for r in ratio.values()), best,
                         grid_rule("auto", bits)])
    print("# narrow's squared RTN error / the rule's, range over the five layers")
    print(tabulate(rows, headers=["group", "bits", "narrow / full", "narrow / tight", "least error", "auto"],
                   tablefmt="github"))


if __name__ == "__main__":
    main(sys.argv[1])
