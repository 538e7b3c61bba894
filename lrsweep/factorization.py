"""What a compression method returns: a factorization of one weight matrix W (n x d).

A factorization knows the tensors it stores (``stored``: name -> QTensor), how to rebuild
W_hat from them, how many bits it occupies, and how to turn itself into an ``nn.Module``
that computes ``x @ W_hat.T + bias`` efficiently (``as_module``), into an embedding whose
table is W_hat (``as_embedding``: row i embeds token i), and into an output head tied to
that embedding (``tied_head``: the same parameter objects, as tied input/output embeddings). New
structures (sparse, Kronecker, ...) subclass :class:`Factorization` and register themselves in
``KINDS`` for saving/loading.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lrsweep.quant import QTensor

KINDS: dict[str, type[Factorization]] = {}
# stored tensors that hold integer indices (a sparse part in CSR form, a column permutation), not weights
INDEX_KEYS = ("S_col", "S_crow", "perm")


@dataclass
class Factorization:
    """A method's result for one weight W (n x d): the tensors it stores and what they give.

    ``compress_matrix`` returns one; ``compress_`` installs ``as_module()`` (or ``as_embedding()``)
    in place of each target module. Subclasses: ``LowRank`` (L R), ``Dense`` (a quantized W),
    ``LowRankSparse``, ``Kronecker``, ``QuantLowRank`` (Q + L R).
    """

    shape: tuple[int, int]  # (n, d) of the original weight
    rank: int
    stored: dict[str, QTensor]
    info: dict[str, Any] = field(default_factory=dict)  # method details recorded in the row
    dtype: torch.dtype | None = None  # W's dtype: of reconstruct() and of the modules (None: the values' own)

    kind: ClassVar[str] = "abstract"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KINDS[cls.kind] = cls

    @property
    def storage_bits(self) -> int:
        """Bits of the stored tensors, quantizer metadata (scales, indices) included."""
        return sum(q.storage_bits for q in self.stored.values())

    @property
    def params(self) -> int:
        """Stored weight entries (indices of a sparse part excluded): what ``param_ratio`` counts."""
        return sum(q.value.numel() for k, q in self.stored.items() if k.rpartition(".")[2] not in INDEX_KEYS)

    @property
    def bits_per_weight(self) -> float:
        """``storage_bits`` per entry of W."""
        return self.storage_bits / (self.shape[0] * self.shape[1])

    def values(self) -> torch.Tensor:
        """W_hat from the stored values, at their precision (fp32, fp64 for an fp64 W). Subclasses
        implement this (or ``reconstruct``, as subclasses written before ``dtype`` do)."""
        return self.reconstruct()

    def reconstruct(self) -> torch.Tensor:
        """W_hat in W's dtype (``dtype``)."""
        W_hat = self.values()
        return W_hat if self.dtype is None else W_hat.to(self.dtype)

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """A module computing ``x @ W_hat.T + bias`` from the stored tensors, in ``dtype`` (default:
        W's)."""
        raise NotImplementedError

    def as_embedding(self, dtype: torch.dtype | None = None) -> nn.Module:
        """token ids -> rows of W_hat (n tokens x d). By default an nn.Embedding holding the
        reconstruction (n x d in memory; the stored bits are still those of ``stored``)."""
        return dense_embedding(self.reconstruct(), dtype)

    def tied_head(self, embedding: nn.Module, bias: torch.Tensor | None = None) -> nn.Module:
        """x -> x @ W_hat.T + bias from the very parameters of ``embedding`` (made by ``as_embedding``),
        so the two stay tied. By default an nn.Linear whose ``weight`` is the embedding's."""
        return tied_linear(embedding.weight, bias)

    def trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters of ``module`` (made by ``as_module``, ``as_embedding`` or ``tied_head``)
        that hold each stored tensor's value, by stored name (reshaped they equal
        ``stored[name].value``): what healing trains and re-quantizes. Stored tensors absent here
        (sparse indices, a materialized W_hat, ...) stay frozen."""
        return {}

    def rel_error(self, W: torch.Tensor) -> float:
        """||W - W_hat||_F / ||W||_F, computed in fp32."""
        W = W.float()
        return float(torch.linalg.norm(W - self.values().float()) / torch.linalg.norm(W))


@dataclass
class LowRank(Factorization):
    """W_hat = L @ R with L (n x r) and R (r x d), each possibly quantized."""

    kind: ClassVar[str] = "lowrank"

    @classmethod
    def of(cls, L: QTensor, R: QTensor, **info: Any) -> LowRank:
        return cls(shape=(L.value.shape[0], R.value.shape[1]), rank=L.value.shape[1], stored={"L": L, "R": R},
                   info=info)

    def values(self) -> torch.Tensor:
        return self.stored["L"].value @ self.stored["R"].value

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        return LowRankLinear(self.stored["L"].value, self.stored["R"].value, bias, dtype or self.dtype)

    def as_embedding(self, dtype: torch.dtype | None = None) -> nn.Module:
        return LowRankEmbedding(self.stored["L"].value, self.stored["R"].value, dtype or self.dtype)

    def tied_head(self, embedding: nn.Module, bias: torch.Tensor | None = None) -> nn.Module:
        return LowRankHead(embedding, bias)

    def trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        if isinstance(module, LowRankLinear):
            return {"L": module.second.weight, "R": module.first.weight}
        return {"L": module.L, "R": module.R}  # LowRankEmbedding, LowRankHead


@dataclass
class Dense(Factorization):
    """W_hat stored as one (possibly quantized) matrix: the naive quantization baseline."""

    kind: ClassVar[str] = "dense"

    @classmethod
    def of(cls, W: QTensor, **info: Any) -> Dense:
        n, d = W.value.shape
        return cls(shape=(n, d), rank=min(n, d), stored={"W": W}, info=info)

    def values(self) -> torch.Tensor:
        return self.stored["W"].value

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        return dense_linear(self.stored["W"].value, bias, dtype or self.dtype)

    def trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {"W": module.weight}


def dense_embedding(W: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Embedding:
    """An nn.Embedding whose table is (a copy of) W."""
    return nn.Embedding.from_pretrained(W.detach().to(dtype=dtype or W.dtype, copy=True), freeze=False)


def tied_linear(weight: nn.Parameter, bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear whose ``weight`` is ``weight`` itself (the same Parameter: tied, as HF ties embeddings)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = weight
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype, copy=True))
    return lin


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


class LowRankEmbedding(nn.Module):
    """ALBERT-style factorized embedding: ids -> L[ids] @ R with L (V x r) the lookup table and
    R (r x H) the projection; r (V + H) parameters instead of V H.

    Like nn.Embedding it has no ``in_features`` (its inputs are token ids, not features), so
    code that feeds float inputs to factorized Linears (``evaluate.layer_fallback``) skips it.
    """

    def __init__(self, L: torch.Tensor, R: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or L.dtype
        self.L = nn.Parameter(L.detach().to(dtype=dtype, copy=True))
        self.R = nn.Parameter(R.detach().to(dtype=dtype, copy=True))
        self.num_embeddings, self.embedding_dim, self.rank = L.shape[0], R.shape[1], R.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.L) @ self.R

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}"


class LowRankHead(nn.Module):
    """x -> (x @ R.T) @ L.T + bias with L and R the very Parameters of a :class:`LowRankEmbedding`:
    an output projection tied to the input embedding (two GEMMs, r (V + H) multiply-adds per token).

    No ``in_features`` on purpose: ``evaluate.layer_fallback`` must not swap one side of a tie
    for an untied dense copy.
    """

    def __init__(self, embedding: LowRankEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        self.L, self.R = embedding.L, embedding.R  # shared, not copied
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device=self.L.device, dtype=self.L.dtype,
                                                                            copy=True))
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.rank = embedding.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.R), self.L, self.bias)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}, " \
               f"bias={self.bias is not None}, tied=True"


@dataclass
class LowRankSparse(Factorization):
    """W_hat = L @ R + S with S sparse in CSR form: values, column indices and row pointers.

    Indices are counted at ceil(log2 d) bits each and row pointers at ceil(log2(nnz + 1)) bits
    (packed, like the integer codes of the quantizers).
    """

    kind: ClassVar[str] = "lowrank_sparse"

    def sparse(self) -> torch.Tensor:
        return csr_decode(self.stored, self.shape)

    def values(self) -> torch.Tensor:
        return self.stored["L"].value @ self.stored["R"].value + self.sparse().to_dense()

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        return LowRankSparseLinear(self.stored["L"].value, self.stored["R"].value, self.sparse(), bias,
                                   dtype or self.dtype)

    def trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        if not isinstance(module, LowRankSparseLinear):  # a materialized W_hat (as_embedding, tied_head)
            return {}
        return {"L": module.second.weight, "R": module.first.weight}  # S (values at fixed support) frozen


class LowRankSparseLinear(LowRankLinear):
    """Two GEMMs plus a sparse-dense product: x R^T L^T + x S^T + bias (S kept sparse, fp32)."""

    def __init__(self, L: torch.Tensor, R: torch.Tensor, S: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype | None = None):
        super().__init__(L, R, bias, dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("S", S.float().to_sparse_csr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        sparse = (self.S @ flat.T.float()).T.to(x.dtype)
        return super().forward(x) + sparse.reshape(*x.shape[:-1], -1)


def csr_decode(stored: dict[str, QTensor], shape: tuple[int, int]) -> torch.Tensor:
    """S as a coalesced sparse COO tensor (fp32), decoded from the stored CSR arrays
    ``S_values``, ``S_col`` (column indices) and ``S_crow`` (row pointers)."""
    values = stored["S_values"].value.reshape(-1)
    crow, cols = stored["S_crow"].codes.long(), stored["S_col"].codes.long()
    rows = torch.repeat_interleave(torch.arange(shape[0], device=crow.device), crow.diff())
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size=shape, is_coalesced=True,
                                   check_invariants=True)


def index_tensor(idx: torch.Tensor, bits: int) -> QTensor:
    """Integer indices stored at ``bits`` bits each (no metadata)."""
    return QTensor(value=idx.float(), bits=max(1, bits), codes=idx.to(torch.int32))


@dataclass
class Kronecker(Factorization):
    """W_hat = sum_k A_k kron B_k with A_k (n1 x d1), B_k (n2 x d2); stored as A (r x n1*d1), B (r x n2*d2)."""

    kind: ClassVar[str] = "kronecker"

    @property
    def a_shape(self) -> tuple[int, int]:
        return tuple(self.info["a_shape"])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        (n1, d1), (n, d) = self.a_shape, self.shape
        r = self.rank
        A = self.stored["A"].value.reshape(r, n1, d1)
        B = self.stored["B"].value.reshape(r, n // n1, d // d1)
        return A, B

    def values(self) -> torch.Tensor:
        A, B = self.factors()
        return sum(torch.kron(a, b) for a, b in zip(A, B, strict=True))

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        A, B = self.factors()
        return KroneckerLinear(A, B, bias, dtype or self.dtype)

    def trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        if not isinstance(module, KroneckerLinear):  # a materialized W_hat (as_embedding, tied_head)
            return {}
        return {"A": module.A, "B": module.B}


class KroneckerLinear(nn.Module):
    """x -> sum_k A_k X B_k^T (X = x reshaped to d1 x d2) + bias, never materializing W_hat.

    Cost per token: r * (d1 d2 n2 + n1 d1 n2) multiply-adds instead of n d.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or A.dtype
        self.A = nn.Parameter(A.to(dtype))  # (r, n1, d1)
        self.B = nn.Parameter(B.to(dtype))  # (r, n2, d2)
        self.bias = nn.Parameter(bias.to(dtype)) if bias is not None else None
        r, n1, d1 = A.shape
        _, n2, d2 = B.shape
        self.in_features, self.out_features, self.rank = d1 * d2, n1 * n2, r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, n1, d1 = self.A.shape
        _, n2, d2 = self.B.shape
        t = x.numel() // (d1 * d2)
        # T[t, a, k, c] = sum_b X[t, a, b] B_k[c, b]: one GEMM against all B_k at once
        T = (x.reshape(t * d1, d2) @ self.B.reshape(r * n2, d2).T).reshape(t, d1, r, n2)
        # y[t, i, c] = sum_{k, a} A_k[i, a] T[t, a, k, c]: one batched GEMM against all A_k
        T = T.permute(0, 2, 1, 3).reshape(t, r * d1, n2)
        y = (self.A.permute(1, 0, 2).reshape(n1, r * d1) @ T).reshape(*x.shape[:-1], n1 * n2)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, terms={self.rank}"


@dataclass
class QuantLowRank(Factorization):
    """W_hat = Q + L R: Q (n x d) quantized, plus an optional low-rank correction L (n x r) R (r x d).

    Stored: ``Q`` (integer codes and scales), optionally ``perm`` (Q's columns are W's columns
    ``perm``: GPTQ's act-order with per-group scales keeps the groups contiguous in that order),
    and ``L``, ``R`` when there is a correction (GPTQ alone has none; its rank is min(n, d) like
    :class:`Dense`). The module holds Q in its stored order and gathers the input columns when
    permuted, so every stored tensor has a parameter that equals it (healing trains Q, L and R).
    """

    kind: ClassVar[str] = "quant_lowrank"

    @classmethod
    def of(cls, stored: dict[str, QTensor], **info: Any) -> QuantLowRank:
        n, d = stored["Q"].value.shape
        rank = stored["L"].value.shape[1] if "L" in stored else min(n, d)
        return cls(shape=(n, d), rank=rank, stored=stored, info=info)

    def perm(self) -> torch.Tensor | None:
        return self.stored["perm"].codes.long() if "perm" in self.stored else None

    def quantized(self) -> torch.Tensor:
        """Q in W's column order."""
        Q, perm = self.stored["Q"].value, self.perm()
        return Q if perm is None else Q[:, torch.argsort(perm.to(Q.device))]

    def values(self) -> torch.Tensor:
        if "L" not in self.stored:
            return self.quantized()
        return self.quantized() + self.stored["L"].value @ self.stored["R"].value

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        L, R = (self.stored["L"].value, self.stored["R"].value) if "L" in self.stored else (None, None)
        return QuantLowRankLinear(self.stored["Q"].value, self.perm(), L, R, bias, dtype or self.dtype)

    def trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        if not isinstance(module, QuantLowRankLinear):  # a materialized W_hat (as_embedding, tied_head)
            return {}
        lowrank = {"L": module.lowrank.second.weight, "R": module.lowrank.first.weight} if module.lowrank else {}
        return {"Q": module.weight, **lowrank}


class QuantLowRankLinear(nn.Module):
    """x -> x[..., perm] Q^T + (x R^T) L^T + bias: Q dequantized once (a dense GEMM), plus the
    two thin GEMMs of the correction when there is one."""

    def __init__(self, Q: torch.Tensor, perm: torch.Tensor | None, L: torch.Tensor | None, R: torch.Tensor | None,
                 bias: torch.Tensor | None, dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or Q.dtype
        self.weight = nn.Parameter(Q.detach().to(dtype=dtype, copy=True))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device=Q.device, dtype=dtype, copy=True))
        self.register_buffer("perm", None if perm is None else perm.to(Q.device))
        self.lowrank = LowRankLinear(L, R, None, dtype) if L is not None else None
        self.out_features, self.in_features = Q.shape
        self.rank = 0 if R is None else R.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = x if self.perm is None else x.index_select(-1, self.perm)
        y = nn.functional.linear(xq, self.weight, self.bias)
        return y if self.lowrank is None else y + self.lowrank(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"act_order={self.perm is not None}"
