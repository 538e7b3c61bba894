"""Dobi-SVD (Wang et al., ICLR 2025; wangqinsi1/Dobi-SVD): truncation positions learned by gradient
descent on the calibration data, an IPCA weight update, and optional remapping.

Training (:func:`train`, the spec's ``prepare``, run by the schedule before compression): every target
Linear's output A = x W^T (per sequence, T x n; bias apart) is replaced by its soft truncation
A V diag(t) V^T, with V^T from the SVD of A and t_i = 0.5 tanh(β (γ - i)) + 0.5 (i = 1, 2, ...), γ one
trainable position per layer. Adam minimizes the calibration LM loss + λ |ratio(γ) - param_ratio|,
ratio(γ) = Σ_l min(γ_l c_l, n_l d_l) / Σ_l n_l d_l (c_l: parameters per rank). Gradients reach γ and
the layers' inputs through A V diag(t) V^T with V held fixed (the reference differentiates the SVD
itself with a stabilized backward). The final positions give ranks r_l = ceil(γ_l), lowered one at a
time (the largest first) until the model stores no more than param_ratio of the dense weights.
Weight update (IPCA): a last pass accumulates, per layer, P = Σ_seq V_r V_r^T over the top r right
singular vectors of each sequence's A; its top r eigenvectors Q (n x r) are the principal components
the reference's incremental PCA estimates (uncentered here: singular vectors carry random signs, so
their mean is ~0). W' = Q diag(t_1..r) Q^T W, stored as L = Q, R = diag(t) Q^T W.
Remapping (``remap=true``): each factor's first min(n, d) entries per rank component at 8 bits with one
fp16 absmax per component, the rest of the longer factor in fp16: r (16 max(n, d) + 32) bits, so
``param_ratio`` is the memory ratio (its 16-bit equivalent: ``params`` = those bits / 16), as the paper's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lrsweep.factorization import LowRank, LowRankLinear
from lrsweep.methods import LayerStats, QuantizerOptions, register
from lrsweep.quant import quantize


@dataclass
class DobiSVDOptions(QuantizerOptions):
    remap: bool = False  # store U, V remapped: 8-bit square part + fp16 rest (param_ratio = memory ratio)
    epochs: int = 2  # passes over the calibration batches training the truncation positions
    lr: float = 2.0  # Adam's learning rate on the positions (in ranks)
    beta: float = 1.0  # sharpness of the soft truncation tanh(beta (gamma - i))
    lam: float = 10.0  # weight of the |ratio - param_ratio| penalty


class Remapped(LowRank):
    """Dobi-SVD's remapped storage: the square part of each factor per rank component at 8 bits (absmax
    per component), the longer factor's remainder in fp16 (stored: Lq, Rq and Lx or Rx)."""

    kind: ClassVar[str] = "dobi_remapped"

    @classmethod
    def of(cls, L: torch.Tensor, R: torch.Tensor, **info: Any) -> Remapped:
        (n, r), d = L.shape, R.shape[1]
        k = min(n, d)
        stored = {"Lq": quantize(L[:k].T, 8, "channel"), "Rq": quantize(R[:, :k], 8, "channel")}
        if n > k:
            stored["Lx"] = quantize(L[k:], 16)
        if d > k:
            stored["Rx"] = quantize(R[:, k:], 16)
        return cls(shape=(n, d), rank=r, stored=stored, info=info)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stored
        L = torch.cat([s["Lq"].value.T, *([s["Lx"].value] if "Lx" in s else [])])
        R = torch.cat([s["Rq"].value, *([s["Rx"].value] if "Rx" in s else [])], dim=1)
        return L, R

    def values(self) -> torch.Tensor:
        L, R = self.factors()
        return L @ R

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        return LowRankLinear(*self.factors(), bias, dtype or self.dtype)

    def trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {}


def remap_bits(n: int, d: int, rank: int) -> int:
    """Stored bits of a remapped rank-``rank`` factorization: r (16 max(n, d) + 32)."""
    return rank * (8 * min(n, d) * 2 + 16 * (max(n, d) - min(n, d)) + 2 * 16)


def _bits(n: int, d: int, rank: int, bits: int, o: DobiSVDOptions) -> int:
    return remap_bits(n, d, rank) if o.remap else o.tensor_bits((n, rank), bits) + o.tensor_bits((rank, d), bits)


def _params(n: int, d: int, rank: int, o: DobiSVDOptions) -> int:
    """Parameters, or with remapping their 16-bit equivalent (the paper's memory ratio)."""
    return remap_bits(n, d, rank) // 16 if o.remap else rank * (n + d)


def keep(gamma: torch.Tensor | float, k: int, beta: float) -> torch.Tensor:
    """t_i = 0.5 tanh(beta (gamma - i)) + 0.5 for i = 1..k."""
    i = torch.arange(1, k + 1, dtype=torch.float64)
    gamma = gamma if isinstance(gamma, torch.Tensor) else torch.tensor(float(gamma), dtype=torch.float64)
    return 0.5 * torch.tanh(beta * (gamma.double() - i.to(gamma.device))) + 0.5


def soft_truncate(A: torch.Tensor, gamma: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A V diag(t) V^T per sequence of A (B x T x n), V^T (B x k x n)), V from the SVD of A, held fixed."""
    Vh = torch.linalg.svd(A.detach().double(), full_matrices=False)[2]
    t = keep(gamma, Vh.shape[1], beta).to(A.device)
    out = ((A.double() @ Vh.transpose(1, 2)) * t) @ Vh
    return out.to(A.dtype), Vh


class _Truncation:
    """Forward hooks that soft-truncate each layer's output; optionally accumulate P = Σ V_r V_r^T."""

    def __init__(self, layers: dict[str, nn.Linear], gammas: dict[str, torch.Tensor], beta: float):
        self.gammas, self.beta, self.P = gammas, beta, None
        self.handles = [lin.register_forward_hook(self._hook(name)) for name, lin in layers.items()]

    def _hook(self, name: str):
        def fn(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
            bias = module.bias if module.bias is not None else 0
            A = output - bias
            shape = A.shape
            A3 = A.reshape(-1, shape[-2], shape[-1]) if A.dim() > 2 else A[None]
            out, Vh = soft_truncate(A3, self.gammas[name], self.beta)
            if self.P is not None:
                r = max(1, min(Vh.shape[1], math.ceil(float(self.gammas[name].detach()))))
                V = Vh[:, :r]
                self.P[name] = self.P.get(name, 0) + torch.einsum("bki,bkj->ij", V, V)
            return out.reshape(shape) + bias

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def fit_ranks(gammas: dict[str, float], shapes: dict[str, tuple[int, int]], cost, ratio: float) -> dict[str, int]:
    """r_l = ceil(gamma_l) within [1, min(n, d)], lowered (largest first) until Σ cost <= ratio Σ n d."""
    ranks = {n: max(1, min(min(shapes[n]), math.ceil(g))) for n, g in gammas.items()}
    cap = ratio * sum(n * d for n, d in shapes.values())
    while sum(cost(n, r) for n, r in ranks.items()) > cap and any(r > 1 for r in ranks.values()):
        name = max((n for n in ranks if ranks[n] > 1), key=lambda n: (ranks[n] / min(shapes[n]), n))
        ranks[name] -= 1
    return ranks


def train(model: nn.Module, layers: dict[str, nn.Linear], batches: list, loss_fn, ratio: float,
          o: DobiSVDOptions) -> tuple[dict[str, LayerStats], dict[str, int], dict[str, Any]]:
    """(stats with each layer's ``prepared`` (P, gamma), ranks, info): the positions trained on ``batches``."""
    from lrsweep.calib.stats import grads_only

    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    per_rank = {n: (_params(*s, 1, o)) for n, s in shapes.items()}
    dense = sum(a * b for a, b in shapes.values())
    init = {n: max(1.0, min(min(s), ratio * s[0] * s[1] / per_rank[n])) for n, s in shapes.items()}
    gammas = {n: torch.tensor(g, dtype=torch.float64, requires_grad=True) for n, g in init.items()}
    opt = torch.optim.Adam(list(gammas.values()), lr=o.lr)
    hooks = _Truncation(layers, gammas, o.beta)
    t0, history = time.perf_counter(), []
    try:
        with grads_only(model, []):
            for _ in range(o.epochs):
                for batch in batches:
                    size = sum(torch.minimum(g * per_rank[n], torch.tensor(float(shapes[n][0] * shapes[n][1])))
                               for n, g in gammas.items())
                    lm = loss_fn(model, batch).mean()
                    loss = lm + o.lam * (size / dense - ratio).abs()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for n, g in gammas.items():
                            g.clamp_(1.0, float(min(shapes[n])))
                    history.append(round(float(lm.detach()), 4))
            hooks.P = {}
            with torch.no_grad():
                for batch in batches:
                    loss_fn(model, batch)
    finally:
        hooks.remove()
    final = {n: float(g.detach()) for n, g in gammas.items()}
    ranks = fit_ranks(final, shapes, lambda n, r: _params(*shapes[n], r, o), ratio)
    stats = {n: LayerStats(prepared={"P": hooks.P[n].cpu(), "gamma": final[n]}) for n in layers}
    info = {"train_seconds": round(time.perf_counter() - t0, 3), "train_loss": history,
            "gammas": {n: round(g, 3) for n, g in final.items()}}
    return stats, ranks, info


def prepare(model: nn.Module, layers: dict[str, nn.Module], batches: list, loss_fn, ratio: float,
            o: DobiSVDOptions) -> tuple[dict[str, LayerStats], dict[str, int], dict[str, Any]]:
    return train(model, {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}, batches, loss_fn, ratio, o)


@register("dobi_svd", DobiSVDOptions, storage_bits=_bits, params=_params, prepare=prepare)
def dobi_svd(W: torch.Tensor, o: DobiSVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
             stats: LayerStats | None = None) -> LowRank:
    dobi = stats.prepared if stats is not None else None
    if dobi is None:
        raise ValueError("method dobi_svd needs its trained truncation positions and activation components "
                         "(stats=LayerStats(prepared={'P': ..., 'gamma': ...}); in a sweep the schedule trains them "
                         "on calib)")
    P = dobi["P"].to(W.device).double()
    lam, vecs = torch.linalg.eigh((P + P.T) / 2)
    Q = vecs[:, lam.argsort(descending=True)[:rank]]
    t = keep(dobi["gamma"], rank, o.beta).to(W.device)
    L, R = Q, (t[:, None] * Q.T) @ W.double()
    if o.remap:
        return Remapped.of(L.float(), R.float(), gamma=dobi["gamma"])
    return LowRank.of(o.quantize(L.float(), bits), o.quantize(R.float(), bits), gamma=dobi["gamma"])
