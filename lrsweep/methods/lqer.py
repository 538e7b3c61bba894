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

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import QuantLowRank
from lrsweep.methods import lowrank_bits, register, require
from lrsweep.methods.asvd import asvd
from lrsweep.methods.gptq import gptq_quantize, q_bits, quantized_part
from lrsweep.methods.gptq import check as check_quantizer
from lrsweep.methods.svdllm import svdllm
from lrsweep.quant import SUPPORTED_BITS, QTensor, quantize

QUANTIZERS = ("rtn", "gptq")
METRICS = ("qera", "lqer")


def qlr_bits(n: int, d: int, rank: int, bits: int, lr_bits: int = 16, scheme: str = "group", group_size: int = 128,
             act_order: bool = True, quantizer: str = "rtn", **_) -> int:
    """Stored bits of Q + L R: Q's codes and scales (and permutation), L and R at ``lr_bits``."""
    return q_bits(n, d, bits, scheme, group_size, act_order, quantizer) + \
        lowrank_bits(n, d, rank, lr_bits, scheme, group_size)


def check_lr_bits(n: int, d: int, lr_bits: int = 16, **opts) -> None:
    if lr_bits not in SUPPORTED_BITS:
        raise ConfigError("method.lr_bits", f"{lr_bits!r} is not supported", ["2..15", 16, 32])
    check_quantizer(n, d, **opts)


def check(n: int, d: int, quantizer: str = "rtn", metric: str = "qera", **opts) -> None:
    if quantizer not in QUANTIZERS:
        raise ConfigError("method.quantizer", f"{quantizer!r} is unknown", list(QUANTIZERS))
    if metric not in METRICS:
        raise ConfigError("method.metric", f"{metric!r} is unknown", list(METRICS))
    check_lr_bits(n, d, **opts)


def quantize_q(W: torch.Tensor, xtx: torch.Tensor | None, bits: int, quantizer: str, scheme: str, group_size: int,
               damp: float, act_order: bool) -> tuple[QTensor, torch.Tensor | None, dict]:
    """(Q, perm, info) by round-to-nearest or GPTQ."""
    if quantizer == "rtn":
        return quantize(W.float(), bits, scheme, group_size), None, {}
    return gptq_quantize(W, xtx, bits, scheme, group_size, damp, act_order)


def in_w_order(Q: QTensor, perm: torch.Tensor | None) -> torch.Tensor:
    return Q.value if perm is None else Q.value[:, torch.argsort(perm)]


@register("lqer", needs=("xtx", "absmean"), storage_bits=qlr_bits, check=check, params=None)
def lqer(W: torch.Tensor, *, rank: int, bits: int = 4, seed: int = 0, stats=None, lr_bits: int = 16,
         quantizer: str = "rtn", metric: str = "qera", scheme: str = "group", group_size: int = 128,
         damp: float = 0.01, act_order: bool = True, shift: float = 1e-6) -> QuantLowRank:
    xtx = require(stats, "xtx", "lqer") if quantizer == "gptq" or metric == "qera" else None
    Q, perm, info = quantize_q(W, xtx, bits, quantizer, scheme, group_size, damp, act_order)
    E = W.float() - in_w_order(Q, perm).to(W.device)
    if metric == "qera":
        fit = svdllm(E, rank=rank, bits=lr_bits, stats=stats, shift=shift, scheme=scheme, group_size=group_size)
    else:
        require(stats, "absmean", "lqer")
        fit = asvd(E, rank=rank, bits=lr_bits, stats=stats, alpha=1.0, scheme=scheme, group_size=group_size)
    return QuantLowRank.of({**quantized_part(Q, perm), **fit.stored}, quantizer=quantizer, metric=metric,
                           lr_bits=lr_bits, **info, **fit.info)
