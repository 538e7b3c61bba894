"""Methods outside the lrsweep package, plugged in with ``method._target_`` by the tests."""

from __future__ import annotations

from lrsweep.methods.svd import svd


def fails_above(W, *, rank, bits=16, seed=0, stats=None, max_rank: int = 8, **options):
    """SVD up to ``max_rank``; above it, an injected failure inside the method."""
    if rank > max_rank:
        raise RuntimeError(f"injected failure (rank={rank} > {max_rank})")
    return svd(W, rank=rank, bits=bits, seed=seed, **options)
