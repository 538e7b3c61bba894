"""Weights held by several modules (tied input/output embeddings) and their replacement.

With ``tie_word_embeddings`` the output head's ``weight`` is the very Parameter of the input
embedding. Such a matrix is compressed once, and every module holding it is replaced so that
the replacements share their parameters again: the embedding becomes ``f.as_embedding()`` and
each Linear ``f.tied_head(embedding)``. The leader of a group is its first target in model order.
"""

from __future__ import annotations

import torch
from torch import nn

from lrsweep.factorization import Factorization
from lrsweep.models import TARGET_TYPES, set_module


def ties(model: nn.Module, name: str) -> list[str]:
    """The other names of modules holding a parameter of module ``name`` (the same module under
    another name included), in model order; [] when nothing shares its weights."""
    module = model.get_submodule(name)
    own = {id(p) for p in module.parameters()}
    out: list[str] = []
    for n, m in model.named_modules(remove_duplicate=False):
        if n == name or any(n.startswith(f"{prefix}.") for prefix in (name, *out)):
            continue
        if m is module or any(id(p) in own for p in m.parameters(recurse=False)):
            out.append(n)
    return out


def groups(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Leader -> the other modules holding its weight, one entry per weight of ``targets`` (model
    order): a target holding the weight of an earlier one is compressed with it, not again."""
    out: dict[str, list[str]] = {}
    done: set[str] = set()
    for name in targets:
        if name not in done:
            out[name] = ties(model, name)
            done.update(out[name])
    return out


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = module.bias if isinstance(module, nn.Linear) else None
    return bias.detach() if bias is not None else None


def install(model: nn.Module, names: list[str], f: Factorization, dtype: torch.dtype | None = None,
            biases: dict[str, torch.Tensor | None] | None = None) -> nn.Module:
    """Replace the modules ``names`` (holders of one weight, leader first) by ``f``'s modules and
    return the leader's replacement. A lone Linear becomes ``f.as_module(bias)``; an Embedding
    ``f.as_embedding()``; when several modules share the weight, each Linear becomes
    ``f.tied_head`` over the one embedding module, so all of them share its parameters.
    ``biases`` (name -> bias or None) default to the replaced Linears' own."""
    old = {n: model.get_submodule(n) for n in names}
    for n, m in old.items():
        if not isinstance(m, TARGET_TYPES):
            raise TypeError(f"{n} ({type(m).__name__}) holds the weight of {names[0]}, but only "
                            f"{' and '.join(t.__name__ for t in TARGET_TYPES)} modules can be replaced")
    biases = biases if biases is not None else {n: _bias(m) for n, m in old.items()}
    shared = len({id(m) for m in old.values()}) > 1 or any(isinstance(m, nn.Embedding) for m in old.values())
    table = f.as_embedding(dtype) if shared else None
    new: dict[int, nn.Module] = {}
    for n, m in old.items():
        if id(m) not in new:
            if isinstance(m, nn.Embedding):
                new[id(m)] = table
            elif table is None:
                new[id(m)] = f.as_module(biases.get(n), dtype)
            else:
                new[id(m)] = f.tied_head(table, biases.get(n))
        set_module(model, n, new[id(m)])
    return new[id(old[names[0]])]
