"""Sum of r Kronecker products (Van Loan-Pitsianis): W ~ sum_k A_k kron B_k.

With A_k (n1 x d1), B_k (n2 x d2), n = n1 n2, d = d1 d2: rearrange W into R(W) (n1 d1 x n2 d2)
whose rows are the vectorized (n2 x d2) blocks; the rank-r SVD of R(W) gives the best A_k, B_k.
``a_shape`` = (n1, d1); when absent it is chosen so that n1 d1 is as close as possible to
sqrt(n d) (fewest stored entries), keeping A's aspect ratio near W's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lrsweep.errors import ConfigError
from lrsweep.factorization import Kronecker
from lrsweep.methods import LayerStats, register
from lrsweep.methods.svd import SVDOptions, balanced, truncated_svd


@dataclass
class KroneckerOptions(SVDOptions):
    a_shape: list[int] | None = None  # [n1, d1] dividing each layer's (n, d); None: chosen per layer, n1 d1 ~ sqrt(n d)


def divisors(m: int) -> list[int]:
    return [k for k in range(1, m + 1) if m % k == 0]


def auto_a_shape(n: int, d: int) -> tuple[int, int]:
    """(n1, d1) minimizing |log(n1 d1 / sqrt(n d))|, then |log((n1/d1) / (n/d))|."""
    half = math.log(n * d) / 2
    return min(((n1, d1) for n1 in divisors(n) for d1 in divisors(d)),
               key=lambda s: (round(abs(math.log(s[0] * s[1]) - half), 9), abs(math.log(s[0] * d / (s[1] * n)))))


def a_shape_of(n: int, d: int, a_shape=None) -> tuple[int, int]:
    if a_shape is None:
        return auto_a_shape(n, d)
    if (not isinstance(a_shape, list | tuple) or len(a_shape) != 2
            or not all(isinstance(v, int) and v > 0 for v in a_shape)):
        raise ConfigError("method.a_shape", f"{a_shape!r} must be null or [n1, d1] (positive integers)")
    n1, d1 = a_shape
    if n % n1 or d % d1:
        raise ConfigError("method.a_shape", f"{list(a_shape)} does not divide the {n}x{d} layer "
                          f"(n1 must divide {n} and d1 must divide {d})")
    return n1, d1


def terms_limit(n: int, d: int, n1: int, d1: int) -> int:
    """The most Kronecker terms of an n x d matrix with A_k of shape (n1, d1): the rank of R(W)."""
    return min(n1 * d1, (n // n1) * (d // d1))


def kron_max_rank(n: int, d: int, o: KroneckerOptions) -> int:
    return terms_limit(n, d, *a_shape_of(n, d, o.a_shape))


def kron_bits(n: int, d: int, rank: int, bits: int, o: KroneckerOptions) -> int:
    n1, d1 = a_shape_of(n, d, o.a_shape)
    return o.tensor_bits((rank, n1 * d1), bits) + o.tensor_bits((rank, (n // n1) * (d // d1)), bits)


def kron_params(n: int, d: int, rank: int, o: KroneckerOptions) -> int:
    n1, d1 = a_shape_of(n, d, o.a_shape)
    return rank * (n1 * d1 + (n // n1) * (d // d1))


def check(n: int, d: int, o: KroneckerOptions) -> None:
    a_shape_of(n, d, o.a_shape)


def rearrange(W: torch.Tensor, n1: int, d1: int) -> torch.Tensor:
    """R(W): row i1*d1 + j1 is the vectorized block W[i1*n2:(i1+1)*n2, j1*d2:(j1+1)*d2]."""
    n, d = W.shape
    n2, d2 = n // n1, d // d1
    return W.reshape(n1, n2, d1, d2).permute(0, 2, 1, 3).reshape(n1 * d1, n2 * d2)


@register("kronecker", KroneckerOptions, storage_bits=kron_bits, max_rank=kron_max_rank, check=check,
          params=kron_params)
def kronecker(W: torch.Tensor, o: KroneckerOptions, *, rank: int, bits: int = 16, seed: int = 0,
              stats: LayerStats | None = None) -> Kronecker:
    n, d = W.shape
    n1, d1 = a_shape_of(n, d, o.a_shape)
    limit = terms_limit(n, d, n1, d1)
    if not 1 <= rank <= limit:
        raise ConfigError("rank", f"{rank} Kronecker terms exceed the largest {limit} for a_shape {[n1, d1]}")
    U, S, Vh, solver = truncated_svd(rearrange(W.float(), n1, d1), rank, o.driver)
    A, B = balanced(U, S, Vh)
    stored = {"A": o.quantize(A.T.contiguous(), bits), "B": o.quantize(B, bits)}
    return Kronecker(shape=(n, d), rank=rank, stored=stored, info={"a_shape": [n1, d1], "solver": solver})
