"""GPTQ (Frantar et al., ICLR 2023): column-by-column quantization with error feedback.

H = X^T X + damp * mean(diag) * I (the factor 2 of the paper cancels); U = upper Cholesky
factor of H^-1. Column j (in act-order: descending diag(H)) is rounded, its error
e = (w_j - q_j) / U[j, j] is pushed onto the later columns along U[j, j+1:], in lazy blocks
of 128 columns (one GEMM per block for the columns after it). Scales follow ``scheme``, the
``grid`` rule and the ``observer`` (:func:`lrsweep.quant.quantize`): per tensor (``uniform``), per
row (``channel``) and, with a fixed rule (auto, full, tight, narrow) and the absmax observer, per
group (``group``) from W before any update, as llm-compressor's observer does (the feedback grows a
group's range; the range of W clips the updated values a little, which the feedback then corrects:
on SmolLM2 layers at 3 bits this is 1-8 % below the updated weights' absmax). The searches, grid
``best`` (the better of full and tight, the default) and the mse observer (the clipping ratio),
choose each group's scale on its updated columns as the group starts, as GPTQ's ``mse`` option does
in ``find_params`` (the mse search on W's columns lost 3-55 % there: it then fits values the feedback
has since moved).

What the searches minimize (``scale_error``): ``output`` (the default), each column's squared
rounding error times 1 / U[j, j]^2 (:func:`column_weights`), the diagonal of GPTQ's own objective;
or ``weight``, the plain squared error (GPTQ's and llm-compressor's mse searches take the plain
error to the power 2.4). The plain error clips large weights of columns that carry much of the
output (the outlier input channels of SmolLM2's first layers): there it lost to llm-compressor's
absmax scales.

The stored Q has the layout and bits of ``quantize`` at the same scheme, so gptq stores what
``quant`` stores; with ``act_order`` and ``scheme: group`` the groups run over the permuted
columns, so Q is kept in that order and the permutation is stored too (ceil(log2 d) bits per
column, like the g_idx of GPTQ kernels). Columns that never see an input (diag(H) = 0) are set
to zero, as in the reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import QuantLowRank, index_tensor
from lrsweep.methods import LayerStats, QuantizerOptions, register, require
from lrsweep.methods.svdllm import cholesky_shifted
from lrsweep.quant import (FLOAT_BITS, SCHEMES, QTensor, _codes_dtype, _groups, _uniform_round, check_rule,
                           quantize, symmetric_round, symmetric_scales, tensor_bits)

BLOCK = 128


def perm_bits(d: int) -> int:
    """Bits of one stored column index of a d-column matrix."""
    return max(1, (d - 1).bit_length())


def q_bits(n: int, d: int, bits: int, scheme: str, group_size: int, act_order: bool, quantizer: str = "gptq") -> int:
    """Stored bits of Q (n x d): codes and scales as ``quantize`` stores them, plus the permutation
    when gptq keeps Q in act-order (``group`` scheme)."""
    stores_perm = quantizer == "gptq" and act_order and scheme == "group" and bits not in FLOAT_BITS
    return tensor_bits((n, d), bits, scheme, group_size) + (d * perm_bits(d) if stores_perm else 0)


SCALE_ERRORS = ("output", "weight")


@dataclass
class GPTQOptions(QuantizerOptions):
    scheme: str = "group"  # uniform (per-tensor min/max) | channel | group (a scale per group of a row)
    grid: str = "best"  # per group as it starts, the one of full and tight with the lower scale_error
    damp: float = 0.01  # H + damp * mean(diag H) * I
    act_order: bool = True  # columns in descending diag(H)
    scale_error: str = "output"  # grid best's and observer mse's error: output (column_weights) | weight

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_error not in SCALE_ERRORS:
            raise ConfigError("method.scale_error", f"{self.scale_error!r} is unknown", list(SCALE_ERRORS))


def gptq_bits(n: int, d: int, rank: int, bits: int, o: GPTQOptions) -> int:
    return q_bits(n, d, bits, o.scheme, o.group_size, o.act_order)


def check(n: int, d: int, o: GPTQOptions) -> None:
    if o.scheme not in SCHEMES:
        raise ConfigError("method.scheme", f"{o.scheme!r} is unknown", list(SCHEMES))
    if not isinstance(o.damp, int | float) or isinstance(o.damp, bool) or o.damp < 0:
        raise ConfigError("method.damp", f"{o.damp!r} must be a number >= 0 (a fraction of mean(diag(H)))")


def output_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) = ||D X^T||_F^2 for H = X^T X: the output error of a weight error D."""
    D = D.float()
    return float(((D @ H.to(D.device, torch.float32)) * D).sum())


class _Grid:
    """The rounding grid of ``scheme`` at ``bits``, column by column, with the metadata quantize() stores
    (its ``grid`` rule and ``observer`` choose the scales, as in :func:`lrsweep.quant.quantize`, the
    error of their choices weighted per column by ``weight``: see :func:`column_weights`)."""

    def __init__(self, W: torch.Tensor, bits: int, scheme: str, group_size: int, grid: str = "auto",
                 observer: str = "absmax", weight: torch.Tensor | None = None):
        n, d = W.shape
        self.bits, self.scheme, self.qmax = bits, scheme, 2 ** (bits - 1) - 1
        self.grid, self.observer, self.weight = grid, observer, weight
        self.group = d if scheme == "channel" else min(group_size, d) if scheme == "group" else d
        self.as_started = scheme == "group" and (observer == "mse" or grid == "best")
        if scheme == "uniform":  # per-tensor min/max, as quantize(): codes * step + min
            ref = quantize(W, bits, "uniform", observer=observer, weight=weight)
            self.meta = dict(ref.meta)
            self.lo, self.step = ref.meta["min"], ref.meta["step"]
        elif not self.as_started:  # every scale from W before any update
            w = None if weight is None else _groups(weight.reshape(1, d), self.group)[0]
            self.scales = symmetric_scales(_groups(W, self.group), bits, grid, observer, w)[..., 0]
        else:  # searched groups: as each group starts
            self.scales = torch.empty(n, -(-d // self.group), device=W.device)

    def start(self, cols: torch.Tensor, j: int) -> None:
        """The searched scales of the group starting at column j, from its current values ``cols``."""
        if self.as_started:
            w = None if self.weight is None else self.weight[j:j + cols.shape[1]]
            self.scales[:, j // self.group] = symmetric_scales(cols, self.bits, self.grid, self.observer, w)[:, 0]

    def round(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dequantized value, stored code) of column j."""
        if self.scheme == "uniform":
            code, value = _uniform_round(w, self.lo, self.step, 2**self.bits - 1)
            return value, code
        code, value = symmetric_round(w, self.scales[:, j // self.group], self.bits)
        return value, code + self.qmax + 1

    def qtensor(self, value: torch.Tensor, codes: torch.Tensor, group_size: int) -> QTensor:
        meta = self.meta if self.scheme == "uniform" else {"scale": self.scales.half()}
        return QTensor(value=value, bits=self.bits, codes=codes.to(_codes_dtype(self.bits)), meta=meta,
                       scheme=self.scheme, group_size=group_size)


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(U upper with U^T U = (H + damp mean(diag) I)^-1, fp32; extra shift added if H + damp is not PD)."""
    H = H.double()
    damped = H + damp * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    C, added = cholesky_shifted(damped, max(damp, 1e-6))
    Hinv = torch.cholesky_inverse(C)
    return torch.linalg.cholesky(Hinv, upper=True).float(), added


def column_weights(U: torch.Tensor) -> torch.Tensor:
    """1 / U_jj^2 per column: GPTQ's output error is exactly sum_j sum_i (w_ij - q_ij)^2 / U_jj^2, w_j the
    column as it is rounded (updated by the columns before it). W - Q = E U with E_j = (w_j - q_j) / U_jj,
    and U (damped H) U^T = I, so tr((W - Q) H (W - Q)^T) = ||E||^2. A group's scale weighs each of its
    columns' rounding errors so; the feedback inside the group, which the scale also changes, is left out."""
    return U.diagonal().double().square().reciprocal().float()


def gptq_quantize(W: torch.Tensor, xtx: torch.Tensor, bits: int, scheme: str = "uniform", group_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, grid: str = "best", observer: str = "absmax",
                  scale_error: str = "output") -> tuple[QTensor, torch.Tensor | None, dict]:
    """(Q, perm, info): Q quantized by GPTQ; perm (the stored column order of Q) or None when Q is
    stored in W's own column order. ``scale_error``: the error that the ``best`` grid and the ``mse``
    observer minimize, ``output`` (each column's squared error times :func:`column_weights`) or
    ``weight`` (the plain squared error, as GPTQ's and llm-compressor's mse searches)."""
    if bits in FLOAT_BITS:  # no rounding grid to feed errors back through: plain fp16/fp32
        return quantize(W, bits, scheme, group_size), None, {"gptq": "float bits: no error feedback"}
    check_rule(grid, observer)
    if scale_error not in SCALE_ERRORS:
        raise ValueError(f"gptq scale_error={scale_error!r} is unknown; valid: {', '.join(SCALE_ERRORS)}")
    W = W.float().clone()
    _n, d = W.shape
    H = xtx.to(W.device).double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, added = inverse_hessian_factor(H, damp)
    weights = column_weights(U) if scale_error == "output" else None
    rounding = _Grid(W, bits, scheme, group_size, grid, observer, weights)
    block = rounding.group * max(1, BLOCK // rounding.group) if scheme == "group" else BLOCK  # groups never span blocks
    value, codes = torch.zeros_like(W), torch.zeros_like(W)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % rounding.group == 0:
                rounding.start(W1[:, i:i + rounding.group], j)
            w = W1[:, i]
            q, c = rounding.round(w, j)
            value[:, j], codes[:, j] = q, c
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    keep_perm = perm is not None and scheme == "group"
    if perm is not None and not keep_perm:  # per-tensor / per-row scales: back to W's column order
        inv = torch.argsort(perm)
        value, codes = value[:, inv], codes[:, inv]
    info = {"damp": damp, "act_order": act_order, "dead_columns": int(dead.sum()), "hessian_shift": added}
    return rounding.qtensor(value, codes, group_size), perm if keep_perm else None, info


def quantized_part(Q: QTensor, perm: torch.Tensor | None) -> dict[str, QTensor]:
    """The stored tensors of Q: its codes and scales, and the column order when kept permuted."""
    return {"Q": Q} if perm is None else {"Q": Q, "perm": index_tensor(perm, perm_bits(perm.numel()))}


@register("gptq", GPTQOptions, needs=("xtx",), storage_bits=gptq_bits, has_rank=False, check=check, params=None)
def gptq(W: torch.Tensor, o: GPTQOptions, *, rank: int | None = None, bits: int = 4, seed: int = 0,
         stats: LayerStats | None = None) -> QuantLowRank:
    xtx = require(stats, "xtx", "gptq")
    Q, perm, info = gptq_quantize(W, xtx, bits, o.scheme, o.group_size, o.damp, o.act_order, o.grid, o.observer,
                                  o.scale_error)
    return QuantLowRank.of(quantized_part(Q, perm), scheme=o.scheme, **info)

