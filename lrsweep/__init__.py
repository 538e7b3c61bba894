"""lrsweep: low-rank and low-precision compression experiments, from Hydra grids to paper tables.

The Python API loads on first use (``import lrsweep`` imports neither torch nor Hydra):
``compress_(model, method, targets, ...)`` compresses a model's layers in place, ``compress_matrix(W, method, ...)``
one matrix, ``load_compressed(path)`` reads a saved model back; a method is a name with keyword options or
one of the options dataclasses of :mod:`lrsweep.methods` (e.g. ``lrsweep.methods.svd.SVDOptions``).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module defining it
_API = {"compress_": "lrsweep.compress", "compress_matrix": "lrsweep.compress", "LayerResult": "lrsweep.compress",
        "Factorization": "lrsweep.factorization", "load_compressed": "lrsweep.save"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lrsweep' has no attribute {name!r}")
    if name == "load_compressed":
        importlib.import_module("lrsweep.heal")  # registers the healers' factorization kinds
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
