"""Truncated SVD (Eckart-Young): L = U_r S_r^1/2, R = S_r^1/2 V_r^T, each quantized at ``bits``.

On CUDA the default (``driver: auto``) is cuSOLVER's ``gesvda`` on the tall orientation of W,
much faster than the default driver and accurate for the leading singular triplets; the solver
used is recorded in the factorization's ``info`` (and so in the row).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lrsweep.factorization import LowRank
from lrsweep.methods import LayerStats, QuantizerOptions, register

DRIVERS = ("auto", "default", "gesvd", "gesvdj", "gesvda")


def compute_dtype(W: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else (fp16, bf16, fp32) is computed in fp32."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


T = TypeVar("T")
_SCOPES: list[dict[str, Any]] = []  # active reuse() scopes, innermost last


@contextmanager
def reuse() -> Iterator[dict[str, Any]]:
    """Keep every full SVD that :func:`truncated_svd` computes within, keyed by the matrix's bytes
    (and shape, dtype, device, driver): the same matrix again is truncated from the kept SVD, not
    decomposed again. Rank allocation reads each layer's spectrum through the method itself, then
    the method compresses at the chosen rank from the same decomposition. The scope yields
    ``{"svds": {key: (U, S, Vh, solver)}, "last": key of the latest call, "hits": reuses}``, and what
    :func:`memo` keeps (``scope[kind]``, reuses in ``scope["memo_hits"][kind]``)."""
    scope: dict[str, Any] = {"svds": {}, "last": None, "hits": 0}
    _SCOPES.append(scope)
    try:
        yield scope
    finally:
        _SCOPES.remove(scope)


def memo(kind: str, key: Callable[[], Hashable], compute: Callable[[], T], take: bool = False) -> T:
    """``compute()`` kept per ``kind`` and ``key()`` in the innermost :func:`reuse` scope, for work that
    does not depend on the rank (a Cholesky factor) or that a later call repeats (a method's result at
    the rank an allocation ships); outside a scope ``compute()`` (``key`` is not called). ``take``:
    hand over a kept result and forget it (or compute without keeping)."""
    if not _SCOPES:
        return compute()
    scope = _SCOPES[-1]
    store, k = scope.setdefault(kind, {}), key()
    if k in store:
        hits = scope.setdefault("memo_hits", {})
        hits[kind] = hits.get(kind, 0) + 1
        return store.pop(k) if take else store[k]
    if take:
        return compute()
    store[k] = compute()
    return store[k]


def from_statistic(kind: str, stat: torch.Tensor, compute: Callable[[], T], *options: Hashable
                   ) -> tuple[tuple, T]:
    """(key, ``compute()``) for what a method derives from a calibration statistic alone (svdllm's
    Cholesky factor, drone's eigenbasis, asvd's scales, fwsvd's weights): kept in the :func:`reuse`
    scope per statistic (identity and version) and ``options``, so layers reading the same X^T X derive
    it once; the key also names the matrix the method then decomposes (``truncated_svd(..., key=)``).
    The statistic is kept with the result, so its id stays unique while the scope lives."""
    key = (kind, id(stat), stat._version, *options)
    return key, memo(kind, lambda: key, lambda: (stat, compute()))[1]


def forget(kind: str, key: Hashable) -> None:
    """Drop a result kept by :func:`memo` in the innermost scope (nothing outside one)."""
    if _SCOPES:
        _SCOPES[-1].get(kind, {}).pop(key, None)


def active() -> dict[str, Any]:
    """The innermost :func:`reuse` scope (RuntimeError outside one)."""
    if not _SCOPES:
        raise RuntimeError("no svd.reuse() scope is active")
    return _SCOPES[-1]


def in_scope() -> bool:
    """Whether a :func:`reuse` scope is active."""
    return bool(_SCOPES)


def decomposed(call: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None:
    """Run ``call()`` in the innermost :func:`reuse` scope; the full (U, S, Vh, solver) of the last matrix
    :func:`truncated_svd` truncated during it (kept in the scope), or None when it truncated none."""
    scope = active()
    scope["last"] = None
    call()
    return None if scope["last"] is None else scope["svds"][scope["last"]]


def content_key(W: torch.Tensor) -> str:
    """The matrix's shape, dtype, device and a hash of its bytes. Inside a :func:`reuse` scope a
    tensor's storage is hashed once: a later call on the same storage, view and fingerprint (sum, norm
    and a strided sample's sum) returns the kept key: a weight is read several times while its
    rank is allocated, and hashing reads every byte, the fingerprint a few sums."""
    if not _SCOPES:
        return _hash(W)
    seen = _SCOPES[-1].setdefault("content", {})
    where = (W.untyped_storage().data_ptr(), W.storage_offset(), tuple(W.shape), W.stride(), W.dtype, str(W.device))
    flat, acc = W.detach().reshape(-1), compute_dtype(W)  # a fingerprint that differs only costs a hash
    fingerprint = torch.stack([flat.sum(dtype=acc), torch.linalg.vector_norm(flat, dtype=acc),
                               flat[::97].sum(dtype=torch.float64).to(acc)]).tolist()
    kept = seen.get(where)
    if kept is None or kept[0] != fingerprint:
        kept = seen[where] = (fingerprint, _hash(W))
    return kept[1]


def _hash(W: torch.Tensor) -> str:
    data = W.detach().contiguous().cpu().view(torch.uint8).numpy()
    return f"{tuple(W.shape)}:{W.dtype}:{W.device}:{hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()}"


def truncated_svd(W: torch.Tensor | Callable[[], torch.Tensor], rank: int, driver: str = "auto",
                  key: Callable[[], Hashable] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U_r, S_r, Vh_r, solver) of the rank-``rank`` truncated SVD of W, in fp32 (fp64 for fp64 input);
    inside :func:`reuse`, from the kept decomposition when W was decomposed there before. ``key``: what
    determines W (its inputs' keys, as svdllm's W C), in place of hashing W's bytes; W may then be a
    function that makes the matrix, called only when the scope does not hold its SVD."""
    if driver not in DRIVERS:
        raise ValueError(f"svd driver={driver!r} is unknown; valid: {', '.join(DRIVERS)}")

    def matrix() -> torch.Tensor:
        M = W() if callable(W) else W
        return M.to(compute_dtype(M))

    if not _SCOPES:
        return _truncated_svd(matrix(), rank, driver)
    scope = _SCOPES[-1]
    M = None if key is not None else matrix()
    k = (driver, key()) if key is not None else f"{driver}:{content_key(M)}"
    scope["last"] = k
    if k in scope["svds"]:
        scope["hits"] += 1
    else:
        scope["svds"][k] = _truncated_svd(matrix() if M is None else M, None, driver)
    U, S, Vh, solver = scope["svds"][k]
    return U[:, :rank], S[:rank], Vh[:rank], solver


def _truncated_svd(W: torch.Tensor, rank: int | None,
                   driver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    if driver == "auto":
        driver = "gesvda" if W.is_cuda else "default"
    if driver == "default" or not W.is_cuda:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        solver = "torch.linalg.svd"
    else:  # cuSOLVER drivers; gesvda wants a tall matrix
        wide = W.shape[0] < W.shape[1]
        U, S, Vh = torch.linalg.svd(W.T if wide else W, full_matrices=False, driver=driver)
        if wide:
            U, Vh = Vh.T, U.T
        solver = f"torch.linalg.svd[{driver}]"
    return (U, S, Vh, solver) if rank is None else (U[:, :rank], S[:rank], Vh[:rank], solver)


def balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L = U S^1/2, R = S^1/2 Vh (fp32)."""
    root = S.sqrt()
    return (U * root).float(), (root[:, None] * Vh).float()


@dataclass
class SVDOptions(QuantizerOptions):
    driver: str = "auto"  # auto (gesvda on CUDA, default on CPU) | default | gesvd | gesvdj | gesvda


@register("svd", SVDOptions)
def svd(W: torch.Tensor, o: SVDOptions, *, rank: int, bits: int = 16, seed: int = 0,
        stats: LayerStats | None = None) -> LowRank:
    U, S, Vh, solver = truncated_svd(W, rank, o.driver)
    L, R = balanced(U, S, Vh)
    return LowRank.of(o.quantize(L, bits), o.quantize(R, bits), solver=solver)
