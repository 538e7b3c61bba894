"""Methods whose factorization spans layers (``basis_sharing``): their groups, what they support, and
the joint factorizations that :func:`lrsweep.compress.compress_` installs layer by layer.

A spanning method's spec has ``spans`` (layer name, options -> how many layers of that layer's type
share one factor; 1 keeps the layer to itself) and ``joint`` (the factorizations of one group). Layers
of one type (the name with its block index removed, and the shape: :func:`lrsweep.models.layer_type`)
form groups of consecutive runs in model order. What works with such a method:
  Python API          ``compress_(model, "basis_sharing", group=2, stats=...)``: supported (groups
                      factorized jointly, then installed layer by layer); ``compress_matrix`` of one
                      matrix: only where the factor spans one layer (the method says so otherwise);
  per-layer results   each layer keeps its row entry (rank, error, seconds: the group's split evenly);
                      the shared factor's bits and parameters are counted once, at the group's first layer;
  stream=true, calib.sequential=true   refused: a group spans blocks, these hold one block at a time;
  allocation          refused: the rank is one per group, not per layer;
  heal, save_compressed   refused: a shared tensor would be trained or saved once per layer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from torch import nn

from lrsweep.errors import ConfigError
from lrsweep.methods import LayerStats, MethodSpec
from lrsweep.factorization import Factorization
from lrsweep.models import layer_type


def spans(spec: MethodSpec, names: list[str], opts: dict[str, Any]) -> dict[str, int]:
    """How many layers each layer's factor spans (all 1 for a per-layer method)."""
    return {n: int(spec.spans(n, **opts)) if spec.spans else 1 for n in names}


def groups(shapes: Mapping[str, tuple[int, int]], span: Mapping[str, int]) -> list[list[str]]:
    """Consecutive runs of ``span`` layers of one type (model order); a ConfigError naming both numbers
    when a type's layer count is not a multiple of its span."""
    by_type: dict[tuple, list[str]] = {}
    for name, shape in shapes.items():
        by_type.setdefault((layer_type(name), tuple(shape)), []).append(name)
    out = []
    for (kind, _), members in by_type.items():
        k = span[members[0]]
        if len(members) % k:
            divisors = [str(g) for g in range(1, len(members) + 1) if len(members) % g == 0]
            raise ConfigError("method.group", f"{k} does not divide the {len(members)} layers of type {kind}",
                              divisors)
        out += [members[i:i + k] for i in range(0, len(members), k)]
    return out


def check(cfg: Any, spec: MethodSpec, opts: dict[str, Any], shapes: Mapping[str, tuple[int, int]]) -> None:
    """ConfigError (before launch) for what a spanning configuration cannot do (module docstring)."""
    span = spans(spec, list(shapes), opts)
    if max(span.values(), default=1) <= 1:
        return
    groups(shapes, span)
    calib = cfg.get("calib") or {}
    why = f"method {spec.name} shares one factor across {max(span.values())} layers of a type"
    for key, bad, reason, valid in (
            ("stream", cfg.get("stream", False), "stream=true holds one block at a time", "stream=false"),
            ("calib.sequential", calib.get("sequential", False), "calib.sequential=true compresses one block at a "
             "time", "calib.sequential=false"),
            ("allocation", cfg.get("allocation", "uniform") != "uniform", "its rank is one per group, not per layer",
             "uniform"),
            ("heal", bool(cfg.get("heal")), "healing would train the shared factor once per layer", "heal=null"),
            ("save_compressed", cfg.get("save_compressed", False), "saving would store the shared factor once per "
             "layer", "save_compressed=false")):
        if bad:
            raise ConfigError(key, f"{why}; {reason}", [valid])


def factorize_groups(spec: MethodSpec, opts: dict[str, Any], layers: Mapping[str, nn.Module],
                     stats: Mapping[str, LayerStats] | None, **call: Any) -> dict[str, tuple[Factorization, float]]:
    """{layer: (factorization, seconds)} of every group ({} for a per-layer configuration); ``call``:
    rank, bits, budget, param_ratio, seed of the compression."""
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items() if isinstance(m, nn.Linear)}
    span = spans(spec, list(shapes), opts)
    if max(span.values(), default=1) <= 1:
        return {}
    out = {}
    for members in groups(shapes, span):
        t0 = time.perf_counter()
        Ws = {n: layers[n].weight.detach() for n in members}
        fs = spec.joint(Ws, {n: (stats or {}).get(n) for n in members}, opts, **call)
        seconds = (time.perf_counter() - t0) / len(members)
        for n in members:
            fs[n].dtype = Ws[n].dtype
            out[n] = (fs[n], seconds)
    return out
