"""What a compression method returns: a factorization of one weight matrix W (n x d).

A factorization knows the tensors it stores (``stored``: name -> QTensor), how to rebuild
W_hat from them, how many bits it occupies, and how to turn itself into an ``nn.Module``
that computes ``x @ W_hat.T + bias`` efficiently. New structures (sparse, Kronecker, ...)
subclass :class:`Factorization` and register themselves in ``KINDS`` for saving/loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lrsweep.quant import QTensor

KINDS: dict[str, type[Factorization]] = {}


@dataclass
class Factorization:
    shape: tuple[int, int]  # (n, d) of the original weight
    rank: int
    stored: dict[str, QTensor]
    info: dict[str, Any] = field(default_factory=dict)  # method details recorded in the row

    kind: ClassVar[str] = "abstract"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KINDS[cls.kind] = cls

    @property
    def storage_bits(self) -> int:
        return sum(q.storage_bits for q in self.stored.values())

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / (self.shape[0] * self.shape[1])

    def reconstruct(self) -> torch.Tensor:
        raise NotImplementedError

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        raise NotImplementedError

    def rel_error(self, W: torch.Tensor) -> float:
        W = W.float()
        return float(torch.linalg.norm(W - self.reconstruct().float()) / torch.linalg.norm(W))


@dataclass
class LowRank(Factorization):
    """W_hat = L @ R with L (n x r) and R (r x d), each possibly quantized."""

    kind: ClassVar[str] = "lowrank"

    @classmethod
    def of(cls, L: QTensor, R: QTensor, **info: Any) -> LowRank:
        return cls(shape=(L.value.shape[0], R.value.shape[1]), rank=L.value.shape[1], stored={"L": L, "R": R}, info=info)

    def reconstruct(self) -> torch.Tensor:
        return self.stored["L"].value @ self.stored["R"].value

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        return LowRankLinear(self.stored["L"].value, self.stored["R"].value, bias, dtype)


@dataclass
class Dense(Factorization):
    """W_hat stored as one (possibly quantized) matrix: the naive quantization baseline."""

    kind: ClassVar[str] = "dense"

    @classmethod
    def of(cls, W: QTensor, **info: Any) -> Dense:
        n, d = W.value.shape
        return cls(shape=(n, d), rank=min(n, d), stored={"W": W}, info=info)

    def reconstruct(self) -> torch.Tensor:
        return self.stored["W"].value

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        return dense_linear(self.stored["W"].value, bias, dtype)


def dense_linear(W: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None) -> nn.Linear:
    dtype = dtype or W.dtype
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class LowRankLinear(nn.Module):
    """x -> (x @ R.T) @ L.T + bias: two GEMMs, r * (n + d) multiply-adds per token."""

    def __init__(self, L: torch.Tensor, R: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None):
        super().__init__()
        self.first = dense_linear(R, None, dtype)
        self.second = dense_linear(L, bias, dtype)
        self.in_features, self.out_features, self.rank = R.shape[1], L.shape[0], R.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
