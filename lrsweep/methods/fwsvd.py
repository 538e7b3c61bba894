"""FWSVD (Hsu et al., ICLR 2022): Fisher-weighted SVD.

The paper weights each parameter's error by its Fisher information F_ij and, since the element-wise
weighted problem has no closed form, gives every parameter of a row one weight, the row's summed
Fisher: w_i = (Σ_j F_ij)^power (power 1/2: Î = diag(√Σ_j F_ij)). SVD of diag(w) W, then
L = diag(w)⁻¹ U_r S_r^½, R = S_r^½ V_rᵀ: the exact minimizer of ||diag(w) (W − L R)||_F.

``side`` says which index of an nn.Linear weight W (out × in) is the paper's row:
  output  (default) w over output rows, summing F over the inputs. The paper writes a layer as
          y = W x + b with W ∈ R^{N×M} (N outputs), factorized W ≈ A B with A = Î⁻¹ U_r S_r
          on the output side, so its rows are output units: the rows of torch's (out × in) weight.
  input   w over input channels, summing F over the outputs: SVD of W diag(w), R ← R diag(w)⁻¹,
          minimizing ||(W − L R) diag(w)||_F. This is what the public reimplementations do:
          ASVD4LLM's ``--scaling_method fisher`` (with ``power`` = alpha/2 = 0.25 at its default
          alpha 0.5, and a mean instead of a sum, which only rescales w) and s-nlp's
          FWSVDCompressedLinear / ``svd_ffn_w_T`` (s-nlp's ``svd_ffn_w`` weights output rows).
Zero weights (rows no sample's gradient reached) get a floor: eps × the largest weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, Metric, register, require
from lrsweep.methods.svd import SVDOptions, balanced, compute_dtype, content_key, from_statistic, truncated_svd

SIDES = ("output", "input")


def importance(fisher: torch.Tensor, side: str = "output", power: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """Weights of the output rows (side=output, length n) or input channels (side=input, length d)."""
    w = fisher.double().sum(dim=1 if side == "output" else 0).clamp_min(0) ** power
    if not torch.isfinite(w).all() or w.max() <= 0:
        raise ValueError("fwsvd: the Fisher statistic is all zero or not finite")
    return w.clamp_min(eps * w.max())


@dataclass
class FWSVDOptions(SVDOptions):
    side: str = "output"  # output: weight rows of the (out x in) weight, as the paper (y = Wx) | input: channels
    power: float = 0.5  # weight = (summed Fisher)^power; 0.5 the paper, 0.25 ASVD4LLM's fisher scaling at alpha 0.5
    eps: float = 1e-6  # floor of the weights, relative to the largest


def check(n: int, d: int, o: FWSVDOptions) -> None:
    if o.side not in SIDES:
        raise ConfigError("method.side", f"{o.side!r} is not a side of the weight", list(SIDES))
    if not isinstance(o.power, int | float) or o.power <= 0:
        raise ConfigError("method.power", f"{o.power!r} must be a positive number (0.5: the paper)")


def layer_weights(W: torch.Tensor, stats: LayerStats | None, o: FWSVDOptions) -> tuple[tuple, torch.Tensor]:
    """(key, w): :func:`importance` of the layer's Fisher statistic on W's device in W's compute dtype,
    derived once per statistic in a :func:`~lrsweep.methods.svd.reuse` scope."""
    fisher = require(stats, "fisher", "fwsvd")
    dtype = compute_dtype(W)
    return from_statistic("fwsvd weights", fisher,
                          lambda: importance(fisher.to(W.device), o.side, o.power, o.eps).to(dtype),
                          str(W.device), dtype, o.side, o.power, o.eps)


def metric(W: torch.Tensor, stats: LayerStats | None, o: FWSVDOptions) -> Metric:
    """M = diag(w) W (side output) or W diag(w) (side input), whose truncation error is the weighted
    ‖diag(w) (W - Ŵ)‖_F or ‖(W - Ŵ) diag(w)‖_F."""
    _, w = layer_weights(W, stats, o)
    scale = w[:, None] if o.side == "output" else w
    return Metric(lambda: W.to(w.dtype) * scale, lambda A: A / scale)


@register("fwsvd", FWSVDOptions, needs=("fisher",), check=check, metric=metric)
def fwsvd(W: torch.Tensor, o: FWSVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
          stats: LayerStats | None = None) -> LowRank:
    check(*W.shape, o)
    Wc = W.to(compute_dtype(W))
    weights, w = layer_weights(W, stats, o)
    scale = w[:, None] if o.side == "output" else w
    U, S, Vh, solver = truncated_svd(lambda: Wc * scale, rank, o.driver,  # keyed by W and the weights, not hashed
                                     key=lambda: (content_key(W), weights))  # W as stored: a bf16 W hashed once
    L, R = balanced(U / w[:, None], S, Vh) if o.side == "output" else balanced(U, S, Vh / w)
    return LowRank.of(o.quantize(L, bits), o.quantize(R, bits), solver=solver, side=o.side)
