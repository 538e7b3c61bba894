"""Saving a compressed model and loading it back, without pickles.

``save_compressed`` writes a folder (``<results_dir>/models/<run_id>/`` from a job):
  factors.safetensors   the stored tensors of every factorization: integer codes + quantizer
                        metadata (or fp16/fp32 values), and each layer's bias;
  dense.safetensors     every other weight of the model (embeddings, norms, untouched layers);
  compressed.json       per factorized module: kind (``lrsweep.factorization.KINDS``), shape, rank,
                        info, how each stored tensor decodes, and ``tied``: the other modules
                        holding the same weight (a tied lm_head); plus the model kind, dtype and
                        the metrics of the run that wrote it;
  config.json, tokenizer files (``save_pretrained``: JSON, no pickles).
``load_compressed(path)`` builds the architecture from config.json, puts the factorized modules
back (``lrsweep.tying.install``: ``as_module``, ``as_embedding``, and ``tied_head`` for the tied
modules, which share the parameters again) and loads the weights: (model, tokenizer).

A stored tensor decodes by its quantizer: ``min``/``step`` (uniform grid: codes * step + min) or
``scale`` (symmetric absmax per group: (codes - 2^(b-1)) * scale); integer indices are stored as
they are (``index``). A tensor whose decoding would
not reproduce its value exactly is saved as fp32 values instead (``encoding: value``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lrsweep import tying
from lrsweep.factorization import KINDS, Factorization
from lrsweep.quant import QTensor

FORMAT = "lrsweep-compressed/1"
DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


# ---------------------------------------------------------------- stored tensors
def _decode(enc: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
    if enc["encoding"] == "value":
        return t["value"].float()
    if enc["encoding"] == "index":
        return t["codes"].float()
    codes, bits = t["codes"].float(), enc["bits"]
    if enc["encoding"] == "uniform":
        return codes * t["step"] + t["min"]
    n, d = codes.shape  # absmax: codes stored offset by 2^(b-1), one fp16 scale per group of a row
    group, qmax = enc["group"], 2 ** (bits - 1) - 1
    pad = (-d) % group
    c = nn.functional.pad(codes - (qmax + 1), (0, pad)).reshape(n, -1, group)
    return (c * t["scale"].float().reshape(n, -1, 1)).reshape(n, -1)[:, :d]


def _encode(q: QTensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(description, tensors) of one stored tensor; exact by construction (checked)."""
    enc: dict[str, Any] = {"bits": q.bits, "shape": list(q.value.shape)}
    if q.codes is not None and q.codes.dim() == 2 and set(q.meta) in ({"min", "step"}, {"scale"}):
        tensors = {"codes": q.codes, **q.meta}
        if "scale" in q.meta:
            d, groups = q.codes.shape[1], q.meta["scale"].shape[1]
            enc.update(encoding="absmax", group=-(-d // groups))
        else:
            enc["encoding"] = "uniform"
        if torch.equal(_decode(enc, tensors).to(q.value.device), q.value.float()):
            return enc, tensors
    if q.codes is not None and not q.meta and torch.equal(q.codes.float(), q.value.float()):
        return {**enc, "encoding": "index"}, {"codes": q.codes}  # integer indices (sparse formats)
    if q.codes is None:  # fp16 / fp32 factors: stored at their own precision
        return {**enc, "encoding": "value"}, q.tensors()
    return {**enc, "encoding": "value"}, {"value": q.value.float()}


# ---------------------------------------------------------------- save
def _bias(module: nn.Module) -> torch.Tensor | None:
    """The module's bias: its output at x = 0 (exact for every affine factorized module); an
    embedding has none, a tied head (no ``in_features``) keeps it in ``.bias``."""
    if not hasattr(module, "in_features"):
        return getattr(module, "bias", None)
    p = next(module.parameters())
    with torch.no_grad():
        b = module(torch.zeros(1, module.in_features, device=p.device, dtype=p.dtype))[0]
    return b if b.abs().max() > 0 else None


def save_compressed(model: nn.Module, factorizations: dict[str, Factorization], path: str | os.PathLike,
                    tokenizer: Any = None, kind: str = "causal_lm", metrics: dict[str, Any] | None = None) -> Path:
    """Write the compressed ``model`` (its factorized modules named in ``factorizations``) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    factors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    replaced: list[str] = []  # every module rebuilt from a factorization (tied ones included)
    for name, f in factorizations.items():
        module = model.get_submodule(name)
        stored = {}
        for key, q in f.stored.items():
            enc, tensors = _encode(q)
            stored[key] = enc
            factors.update({f"{name}/{key}/{k}": v.detach().contiguous().cpu() for k, v in tensors.items()})
        tied = tying.ties(model, name)
        for n in [name, *tied]:
            bias = _bias(model.get_submodule(n))
            if bias is not None:
                factors[f"{n}/bias"] = bias.detach().contiguous().cpu()
        replaced += [name, *tied]
        modules[name] = {"kind": f.kind, "shape": list(f.shape), "rank": f.rank, "stored": stored,
                         "bias": f"{name}/bias" in factors, "tied": tied,
                         "dtype": str(next(module.parameters()).dtype),
                         "info": json.loads(json.dumps(f.info, default=str))}
    prefixes = tuple(f"{n}." for n in replaced)
    dense = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()
             if not k.startswith(prefixes)}
    save_file(factors, str(path / "factors.safetensors"), metadata={"format": FORMAT})
    save_file(dense, str(path / "dense.safetensors"), metadata={"format": FORMAT})
    model.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    desc = {"format": FORMAT, "kind": kind, "dtype": str(next(model.parameters()).dtype), "modules": modules,
            "metrics": metrics or {}}
    (path / "compressed.json").write_text(json.dumps(desc, indent=1))
    return path


# ---------------------------------------------------------------- load
def load_compressed(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(model with its factorized modules, tokenizer or None) from a folder of ``save_compressed``."""
    from transformers import AutoConfig, AutoTokenizer

    from lrsweep.models import _auto_class

    path = Path(path)
    desc = json.loads((path / "compressed.json").read_text())
    if desc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} folder (format {desc.get('format')!r})")
    config = AutoConfig.from_pretrained(path)  # trust_remote_code stays off: only built-in architectures
    model = _auto_class(desc["kind"]).from_config(config).to(DTYPES[desc["dtype"]])
    factors = load_file(str(path / "factors.safetensors"))
    for name, m in desc["modules"].items():
        stored = {}
        for key, enc in m["stored"].items():
            prefix = f"{name}/{key}/"
            tensors = {k[len(prefix):]: v for k, v in factors.items() if k.startswith(prefix)}
            stored[key] = QTensor(value=_decode(enc, tensors), bits=enc["bits"], codes=tensors.get("codes"),
                                  meta={k: v for k, v in tensors.items() if k not in ("codes", "value")})
        f = KINDS[m["kind"]](shape=tuple(m["shape"]), rank=m["rank"], stored=stored, info=m["info"])
        names = [name, *m.get("tied", [])]
        tying.install(model, names, f, DTYPES[m["dtype"]], {n: factors.get(f"{n}/bias") for n in names})
    missing, unexpected = model.load_state_dict(load_file(str(path / "dense.safetensors")), strict=False)
    prefixes = tuple(f"{n}." for name, m in desc["modules"].items() for n in [name, *m.get("tied", [])])
    missing = [k for k in missing if not k.startswith(prefixes)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the architecture (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model.to(device).eval(), tokenizer
