"""LoSparse (Li et al., ICML 2023), one-shot form: W ~ L R + S with S sparse.

L R is the (quantized) truncated SVD; S keeps the ``density * n * d`` largest-magnitude entries of
the residual W - L R (so S also absorbs the factors' quantization error). S is stored in CSR
form: values at ``sparse_bits`` (default: ``bits``), column indices and row pointers packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import LowRankSparse, index_tensor
from lrsweep.methods import LayerStats, lowrank_bits, register
from lrsweep.methods.svd import SVDOptions, balanced, truncated_svd
from lrsweep.quant import SUPPORTED_BITS, QTensor, quantize


@dataclass
class LoSparseOptions(SVDOptions):
    density: float = 0.01  # fraction of entries kept in the sparse residual S
    sparse_bits: int | None = None  # bits of S's values (None: bits)


def sparse_count(n: int, d: int, density: float) -> int:
    return max(1, round(density * n * d))


def index_bits(n: int, d: int, nnz: int) -> tuple[int, int]:
    """(bits per column index, bits per row pointer) of an n x d CSR matrix with nnz entries."""
    return max(1, (d - 1).bit_length()), max(1, nnz.bit_length())


def losparse_bits(n: int, d: int, rank: int, bits: int, o: LoSparseOptions) -> int:
    nnz = sparse_count(n, d, o.density)
    col_bits, ptr_bits = index_bits(n, d, nnz)
    values = o.tensor_bits((1, nnz), o.sparse_bits or bits)
    return lowrank_bits(n, d, rank, bits, o) + values + nnz * col_bits + (n + 1) * ptr_bits


def losparse_params(n: int, d: int, rank: int, o: LoSparseOptions) -> int:
    """L, R and the sparse values (their CSR indices are not weights)."""
    return rank * (n + d) + sparse_count(n, d, o.density)


def check(n: int, d: int, o: LoSparseOptions) -> None:
    if not isinstance(o.density, int | float) or not 0 < o.density < 1:
        raise ConfigError("method.density", f"{o.density!r} must be a fraction of entries in (0, 1)")
    if o.sparse_bits is not None and o.sparse_bits not in SUPPORTED_BITS:
        raise ConfigError("method.sparse_bits", f"{o.sparse_bits!r} is not supported", ["null", "2..15", 16, 32])


@register("losparse", LoSparseOptions, storage_bits=losparse_bits, check=check, params=losparse_params)
def losparse(W: torch.Tensor, o: LoSparseOptions, *, rank: int, bits: int = 16, seed: int = 0,
             stats: LayerStats | None = None) -> LowRankSparse:
    check(*W.shape, o)
    n, d = W.shape
    W = W.float()
    U, S, Vh, solver = truncated_svd(W, rank, o.driver)
    L, R = balanced(U, S, Vh)
    Lq, Rq = o.quantize(L, bits), o.quantize(R, bits)
    resid = W - Lq.value @ Rq.value
    nnz = sparse_count(n, d, o.density)
    idx = largest_entries(resid, nnz)
    values = resid.reshape(-1)[idx]
    stored = {"L": Lq, "R": Rq, **csr_stored(idx, values, (n, d), o.sparse_bits or bits, o.scheme, o.group_size,
                                             **o.rule)}
    return LowRankSparse(shape=(n, d), rank=rank, stored=stored,
                         info={"solver": solver, "density": o.density, "nnz": nnz})


def largest_entries(M: torch.Tensor, count: int) -> torch.Tensor:
    """Flat (row-major, sorted: CSR order) indices of the ``count`` largest-magnitude entries of M."""
    return M.reshape(-1).abs().topk(count).indices.sort().values


def csr_stored(idx: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], bits: int, scheme: str = "uniform",
               group_size: int = 128, grid: str = "auto", observer: str = "absmax") -> dict[str, QTensor]:
    """A sparse matrix given by sorted flat indices and values, stored in CSR form: ``S_values``
    quantized at ``bits``, column indices and row pointers packed (``LowRankSparse.sparse`` decodes)."""
    n, d = shape
    rows, cols = idx // d, idx % d
    crow = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    col_bits, ptr_bits = index_bits(n, d, idx.numel())
    return {"S_values": quantize(values.reshape(1, -1), bits, scheme, group_size, grid, observer),
            "S_col": index_tensor(cols, col_bits), "S_crow": index_tensor(crow, ptr_bits)}
