"""Basis Sharing (Wang et al., ICLR 2025; TUDa-HWAI/Basis_Sharing): one basis shared by ``group``
consecutive layers of one type, each layer with its own coefficients.

For a group W_1..W_k (each n x d) with inputs X_1..X_k: G = Σ_i X_i^T X_i = C C^T (Cholesky, fp64,
shifted like svdllm when not positive definite); the stacked [W_1; ..; W_k] C (kn x d) = U S V^T;
the shared basis is R = S_r V_r^T C^-1 (r x d) and layer i's coefficients L_i = rows i of U_r (n x r),
so W_i ≈ L_i R. The truncation then minimizes Σ_i ||(W_i - L_i R) X̄^T||_F^2 in the metric of the
group's summed statistic. Stored: R once (at the group's first layer) and every L_i: r (d + k n)
entries; ``param_ratio`` p gives r = floor(k n d p / (d + k n)), the reference's rule. Layers
matching ``private`` (o_proj, down_proj, which the paper keeps apart) form groups of one: that is
SVD-LLM's whitening with the basis carrying S. Cross-layer support: :mod:`lrsweep.spanning`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from lrsweep.factorization import Factorization, LowRankLinear
from lrsweep.methods import LayerStats, register, require
from lrsweep.methods.svd import SVDOptions, truncated_svd
from lrsweep.methods.svdllm import cholesky_shifted
from lrsweep.quant import QTensor


@dataclass
class SharedLowRank(Factorization):
    """W_hat = L @ basis, the basis shared by a group of layers: stored (and counted) at the group's
    first layer only (``stored`` holds "R" there); the layers' modules share one basis Linear."""

    basis: QTensor | None = None
    link: dict = field(default_factory=dict, repr=False)  # shared by a group: its basis module per dtype

    kind: ClassVar[str] = "shared_lowrank"

    def values(self) -> torch.Tensor:
        return self.stored["L"].value @ self.basis.value

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        m = LowRankLinear(self.stored["L"].value, self.basis.value, bias, dtype or self.dtype)
        m.first = self.link.setdefault(str(dtype or self.dtype), m.first)
        return m


@dataclass
class BasisSharingOptions(SVDOptions):
    group: int = 2  # consecutive layers of one type sharing a basis
    private: str = r".*\.(o_proj|down_proj)"  # layers (full match) that keep their own basis (group of one)
    shift: float = 1e-6  # as svdllm's: on non-PD X^T X add shift * mean(diag) (x10 per retry)


def _spans(name: str, o: BasisSharingOptions) -> int:
    return 1 if re.fullmatch(o.private, name) else o.group


def _check(n: int, d: int, o: BasisSharingOptions) -> None:
    from lrsweep.errors import ConfigError

    if o.group < 1:
        raise ConfigError("method.group", f"{o.group} must be a positive number of layers")


def group_rank(k: int, n: int, d: int, o: BasisSharingOptions, *, rank: int | None, bits: int,
               budget: float | None, param_ratio: float | None) -> int:
    """The number of basis vectors of a group of k (n x d) layers: ``param_ratio`` (the reference's
    floor(k n d p / (d + k n))), the most that fit ``budget`` bits per weight, or ``rank``."""
    limit = min(k * n, d)
    if param_ratio is not None:
        r = int(k * n * d * param_ratio / (d + k * n))
    elif budget is not None:
        fits = [r for r in range(1, limit + 1)
                if o.tensor_bits((r, d), bits) + k * o.tensor_bits((n, r), bits) <= budget * k * n * d]
        r = max(fits, default=0)
    else:
        r = int(rank)
    if r < 1:
        raise ValueError(f"basis_sharing: the budget leaves a group of {k} {n}x{d} layers no basis vector")
    return min(r, limit)


def joint(Ws: dict[str, torch.Tensor], stats: dict[str, LayerStats | None], o: BasisSharingOptions, *,
          rank: int | None, bits: int, budget: float | None = None, param_ratio: float | None = None,
          seed: int = 0) -> dict[str, SharedLowRank]:
    """The factorizations of one group (its layers in order)."""
    names = list(Ws)
    k, (n, d) = len(names), Ws[names[0]].shape
    device = Ws[names[0]].device
    xtx = sum(require(stats[nm], "xtx", "basis_sharing").to(device).double() for nm in names)
    C, added = cholesky_shifted(xtx, o.shift)
    r = group_rank(k, n, d, o, rank=rank, bits=bits, budget=budget, param_ratio=param_ratio)
    U, S, Vh, solver = truncated_svd(torch.cat([W.double() for W in Ws.values()]) @ C, r, o.driver)
    basis = o.quantize(torch.linalg.solve_triangular(C, S.double()[:, None] * Vh.double(), upper=False,
                                                     left=False).float(), bits)
    link: dict = {}
    out = {}
    for i, nm in enumerate(names):
        L = o.quantize(U[i * n:(i + 1) * n].float(), bits)
        stored = {"L": L, "R": basis} if i == 0 else {"L": L}
        out[nm] = SharedLowRank((n, d), r, stored, {"solver": solver, "cholesky_shift": added, "basis_group": names,
                                                    "basis_owner": i == 0}, basis=basis, link=link)
    return out


@register("basis_sharing", BasisSharingOptions, needs=("xtx",), spans=_spans, joint=joint, check=_check)
def basis_sharing(W: torch.Tensor, o: BasisSharingOptions, *, rank: int, bits: int = 16, seed: int = 0,
                  stats: LayerStats | None = None) -> SharedLowRank:
    """One matrix alone: a group of one (basis and coefficients both stored)."""
    if o.group != 1:
        raise ValueError(f"basis_sharing with group={o.group} shares a basis across layers: compress a model "
                         "(lrsweep.compress_) or pass group=1 for one matrix")
    return joint({"W": W}, {"W": stats}, o, rank=rank, bits=bits, seed=seed)["W"]
