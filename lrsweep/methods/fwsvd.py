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

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import LowRank
from lrsweep.methods import register, require
from lrsweep.methods.svd import balanced, compute_dtype, truncated_svd
from lrsweep.quant import quantize

SIDES = ("output", "input")


def importance(fisher: torch.Tensor, side: str = "output", power: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """Weights of the output rows (side=output, length n) or input channels (side=input, length d)."""
    w = fisher.double().sum(dim=1 if side == "output" else 0).clamp_min(0) ** power
    if not torch.isfinite(w).all() or w.max() <= 0:
        raise ValueError("fwsvd: the Fisher statistic is all zero or not finite")
    return w.clamp_min(eps * w.max())


def check(n: int, d: int, side: str = "output", power: float = 0.5, **_) -> None:
    if side not in SIDES:
        raise ConfigError("method.side", f"{side!r} is not a side of the weight", list(SIDES))
    if not isinstance(power, int | float) or power <= 0:
        raise ConfigError("method.power", f"{power!r} must be a positive number (0.5: the paper)")


@register("fwsvd", needs=("fisher",), check=check)
def fwsvd(W: torch.Tensor, *, rank: int, bits: int = 16, seed: int = 0, stats=None, side: str = "output",
          power: float = 0.5, eps: float = 1e-6, scheme: str = "uniform", group_size: int = 128,
          driver: str = "auto") -> LowRank:
    check(*W.shape, side=side, power=power)
    fisher = require(stats, "fisher", "fwsvd").to(W.device)
    W = W.to(compute_dtype(W))
    w = importance(fisher, side, power, eps).to(W.dtype)
    if side == "output":
        U, S, Vh, solver = truncated_svd(W * w[:, None], rank, driver)
        L, R = balanced(U / w[:, None], S, Vh)
    else:
        U, S, Vh, solver = truncated_svd(W * w, rank, driver)
        L, R = balanced(U, S, Vh / w)
    return LowRank.of(quantize(L, bits, scheme, group_size), quantize(R, bits, scheme, group_size),
                      solver=solver, side=side)
