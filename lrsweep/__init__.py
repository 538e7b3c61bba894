"""lrsweep: low-rank and low-precision compression experiments, from Hydra grids to paper tables."""

from lrsweep import heal  # noqa: F401  (registers the healers' factorization kinds for load_compressed)
from lrsweep.compress import compress_matrix
from lrsweep.factorization import Factorization
from lrsweep.save import load_compressed

__all__ = ["compress_matrix", "Factorization", "load_compressed"]
