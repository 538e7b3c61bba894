"""LQER / QERA: W ~ Q + L R with Q = quantize(W) and L R a rank-r fit of the residual E = W - Q.

``quantizer``: ``rtn`` (round to nearest, :func:`lrsweep.quant.quantize`) or ``gptq``.
``metric`` of the residual fit:
- ``qera`` (default; Zhang et al., ICLR 2025): the output-error optimum, the truncated SVD of E in
  the X^T X metric, i.e. SVD-LLM's Cholesky whitening applied to E (:func:`svdllm`);
- ``lqer`` (Zhang et al., ICML 2024, L2QER): columns scaled by s_j = mean |x_j| before the SVD,
  i.e. ASVD with alpha = 1 applied to E (:func:`asvd`).
L and R are stored at ``lr_bits`` with the same ``scheme`` / ``group_size`` as Q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import QuantLowRank
from lrsweep.methods import LayerStats, Metric, lowrank_bits, register, require
from lrsweep.methods.asvd import ASVDOptions, asvd
from lrsweep.methods.asvd import metric as scaled
from lrsweep.methods.gptq import GPTQOptions, gptq_quantize, q_bits, quantized_part
from lrsweep.methods.gptq import check as check_quantizer
from lrsweep.methods.svdllm import svdllm, whitened
from lrsweep.quant import SUPPORTED_BITS, QTensor

QUANTIZERS = ("rtn", "gptq")
METRICS = ("qera", "lqer")
LQER_SCALES = ASVDOptions(alpha=1.0)  # metric lqer: ASVD's scales with alpha = 1 (s_j = mean |x_j|)


@dataclass
class LQEROptions(GPTQOptions):  # scheme and group_size: of Q, L and R; damp and act_order: gptq quantizer only
    quantizer: str = "rtn"  # rtn (round to nearest) | gptq
    metric: str = "qera"  # qera (exact X^T X whitening, the output-error optimum) | lqer (columns scaled by mean|x|)
    lr_bits: int = 16  # bits of L and R: 2..15, 16 (fp16), 32
    shift: float = 1e-6  # qera: X^T X + shift * mean(diag) when not positive definite (x10 per retry)


def qlr_bits(n: int, d: int, rank: int, bits: int, o: LQEROptions) -> int:
    """Stored bits of Q + L R: Q's codes and scales (and permutation), L and R at ``lr_bits`` (also
    caldera's, whose options say ``quantizer`` gptq)."""
    return q_bits(n, d, bits, o.scheme, o.group_size, o.act_order, o.quantizer) + lowrank_bits(n, d, rank, o.lr_bits, o)


def check_lr_bits(n: int, d: int, o: LQEROptions) -> None:
    if o.lr_bits not in SUPPORTED_BITS:
        raise ConfigError("method.lr_bits", f"{o.lr_bits!r} is not supported", ["2..15", 16, 32])
    check_quantizer(n, d, o)


def check(n: int, d: int, o: LQEROptions) -> None:
    if o.quantizer not in QUANTIZERS:
        raise ConfigError("method.quantizer", f"{o.quantizer!r} is unknown", list(QUANTIZERS))
    if o.metric not in METRICS:
        raise ConfigError("method.metric", f"{o.metric!r} is unknown", list(METRICS))
    check_lr_bits(n, d, o)


def quantize_q(W: torch.Tensor, xtx: torch.Tensor | None, bits: int, o: LQEROptions
               ) -> tuple[QTensor, torch.Tensor | None, dict]:
    """(Q, perm, info) by round-to-nearest or GPTQ (``o.quantizer``), on ``o``'s grid."""
    if o.quantizer == "rtn":
        return o.quantize(W.float(), bits), None, {}
    return gptq_quantize(W, xtx, bits, o.scheme, o.group_size, o.damp, o.act_order, **o.rule,
                         scale_error=o.scale_error)


def in_w_order(Q: QTensor, perm: torch.Tensor | None) -> torch.Tensor:
    return Q.value if perm is None else Q.value[:, torch.argsort(perm)]


def metric(W: torch.Tensor, stats: LayerStats | None, o: LQEROptions) -> Metric:
    """The residual fit's metric: qera's X^T X whitening or lqer's columns scaled by mean |x|."""
    return whitened(W, stats, o.shift, "lqer") if o.metric == "qera" else scaled(W, stats, LQER_SCALES)


@register("lqer", LQEROptions, needs=("xtx", "absmean"), storage_bits=qlr_bits, check=check, params=None,
          metric=metric)
def lqer(W: torch.Tensor, o: LQEROptions, *, rank: int, bits: int = 4, seed: int = 0,
         stats: LayerStats | None = None) -> QuantLowRank:
    xtx = require(stats, "xtx", "lqer") if o.quantizer == "gptq" or o.metric == "qera" else None
    Q, perm, info = quantize_q(W, xtx, bits, o)
    E = W.float() - in_w_order(Q, perm).to(W.device)
    quantizer = {"scheme": o.scheme, "group_size": o.group_size, **o.rule}
    if o.metric == "qera":
        fit = svdllm(E, rank=rank, bits=o.lr_bits, stats=stats, shift=o.shift, **quantizer)
    else:
        require(stats, "absmean", "lqer")
        fit = asvd(E, LQER_SCALES, rank=rank, bits=o.lr_bits, stats=stats, **quantizer)
    return QuantLowRank.of({**quantized_part(Q, perm), **fit.stored}, quantizer=o.quantizer, metric=o.metric,
                           lr_bits=o.lr_bits, **info, **fit.info)
