"""heal=dsee: a DSEE-style (Chen et al., 2021) sparse + low-rank update learned on the frozen
compressed model: each compressed Linear computes x -> layer(x) + x (U V + S)^T.

U (n x k) starts at zero and V (k x d) random (LoRA's start: the update is zero at step 0); S has a
fixed support, the ``heal.density`` share of entries where |W - W_hat| is largest, with values
starting at zero. They train through the quantizer they are stored with (``heal.bits``,
straight-through gradients); afterwards they are stored quantized and the layer becomes a
:class:`Delta` factorization whose stored tensors (the compressed layer's, U, V and S in CSR
form) are all counted: the row's bits/weight include the update.
Layers that are embeddings or tied to another module stay as they are (listed in the row).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from lrsweep.compress import LayerResult
from lrsweep.errors import ConfigError
from lrsweep.factorization import KINDS, Factorization, csr_decode
from lrsweep.heal import Trained, register
from lrsweep.heal.distill import factorization
from lrsweep.methods.losparse import csr_stored, largest_entries, sparse_count
from lrsweep.models import set_module
from lrsweep.quant import SCHEMES, SUPPORTED_BITS, QTensor, quantize


@dataclass
class Delta(Factorization):
    """W_hat = base W_hat + U V + S: a compressed layer with a learned sparse + low-rank update.

    Stored: the base factorization's tensors (prefixed ``base.``), ``U``, ``V`` and S in CSR form
    (``S_values``, ``S_col``, ``S_crow``); ``info["base"]`` names the base kind, rank and info.
    """

    kind: ClassVar[str] = "delta"

    @classmethod
    def of(cls, base: Factorization, U: QTensor, V: QTensor, sparse: dict[str, QTensor], **info: Any) -> Delta:
        stored = {**{f"base.{k}": q for k, q in base.stored.items()}, "U": U, "V": V, **sparse}
        info = {"base": {"kind": base.kind, "rank": base.rank, "info": base.info},
                "update_rank": U.value.shape[1], **info}
        return cls(shape=base.shape, rank=base.rank, stored=stored, info=info)

    @property
    def base(self) -> Factorization:
        b = self.info["base"]
        stored = {k[len("base."):]: q for k, q in self.stored.items() if k.startswith("base.")}
        return KINDS[b["kind"]](shape=self.shape, rank=b["rank"], stored=stored, info=b["info"])

    def sparse(self) -> torch.Tensor:
        return csr_decode(self.stored, self.shape)

    def reconstruct(self) -> torch.Tensor:
        return self.base.reconstruct() + self.stored["U"].value @ self.stored["V"].value + self.sparse().to_dense()

    def as_module(self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        S = self.sparse().coalesce()
        rows, cols = S.indices()
        return DeltaLinear(self.base.as_module(bias, dtype), self.stored["U"].value, self.stored["V"].value,
                           rows, cols, S.values(), dtype)

    def trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {"U": module.U, "V": module.V, "S_values": module.values}


class DeltaLinear(nn.Module):
    """x -> base(x) + (x V^T) U^T + x S^T, S given by (rows, cols, values): the values train."""

    def __init__(self, base: nn.Module, U: torch.Tensor, V: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 values: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or next(base.parameters()).dtype
        self.base = base
        self.U, self.V = nn.Parameter(U.to(dtype)), nn.Parameter(V.to(dtype))
        self.values = nn.Parameter(values.to(dtype))
        self.register_buffer("rows", rows.long())
        self.register_buffer("cols", cols.long())
        self.in_features, self.out_features = V.shape[1], U.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x) + nn.functional.linear(nn.functional.linear(x, self.V), self.U)
        return y.index_add(-1, self.rows, x[..., self.cols] * self.values)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, update_rank={self.U.shape[1]}, " \
               f"nnz={self.values.numel()}"


def _healable(original: nn.Module, result: LayerResult) -> bool:
    """A Linear layer holding its weight alone (embeddings and tied weights keep their modules)."""
    return isinstance(original, nn.Linear) and not result.info.get("tied")


def prepare(model: nn.Module, results: list[LayerResult], originals: dict[str, nn.Module],
            hcfg: DictConfig) -> list[Trained]:
    gen = torch.Generator().manual_seed(0)
    store = _store(hcfg)
    trained: list[Trained] = []
    for r in results:
        module = model.get_submodule(r.name)
        if not _healable(originals[r.name], r):
            continue
        W = originals[r.name].weight.detach()
        n, d = W.shape
        k = min(int(hcfg.rank), n, d)
        resid = W.float() - factorization(r).reconstruct().float().to(W.device)
        idx = largest_entries(resid, sparse_count(n, d, hcfg.density))
        V = torch.randn(k, d, generator=gen) / math.sqrt(d)
        delta = DeltaLinear(module, torch.zeros(n, k), V, idx // d, idx % d, torch.zeros(idx.numel())).to(W.device)
        set_module(model, r.name, delta)
        trained += [Trained(p, lambda x: store(x).value) for p in (delta.U, delta.V, delta.values)]
    return trained


def _store(hcfg: DictConfig) -> Callable[[torch.Tensor], QTensor]:
    """How the update is stored: U, V (2-D) and the values of S (1-D, one row) at ``heal.bits``."""
    bits, scheme, group = int(hcfg.bits), str(hcfg.scheme), int(hcfg.group_size)
    # the grid heal's runs were identified with (heal has no grid option yet: its rows keep their meaning)
    return lambda x: quantize(x if x.dim() == 2 else x.reshape(1, -1), bits, scheme, group, grid="narrow")


@torch.no_grad()
def finish(model: nn.Module, results: list[LayerResult], originals: dict[str, nn.Module],
           hcfg: DictConfig) -> dict[str, Any]:
    store = _store(hcfg)
    skipped = []
    for r in results:
        module = model.get_submodule(r.name)
        if not isinstance(module, DeltaLinear):
            skipped.append(r.name)
            continue
        n, d = r.shape
        idx = module.rows * d + module.cols
        sparse = csr_stored(idx, module.values.float(), (n, d), int(hcfg.bits), str(hcfg.scheme), int(hcfg.group_size),
                            grid="narrow")
        U, V = store(module.U.float()), store(module.V.float())
        f = Delta.of(factorization(r), U, V, sparse, density=float(hcfg.density), nnz=idx.numel())
        for key, p in f.trainable(module).items():  # the module computes with the stored values
            p.copy_(f.stored[key].value.reshape(p.shape).to(p.dtype))
        r.factorization, r.info = f, {**r.info, "heal": "dsee"}
        r.rel_err = f.rel_error(originals[r.name].weight.detach())
        r.storage_bits, r.params = f.storage_bits, f.params
    return {"update_rank": int(hcfg.rank), "density": float(hcfg.density), "bits": int(hcfg.bits),
            "skipped_layers": skipped}


def check(hcfg: DictConfig) -> None:
    rank, density, bits = hcfg.get("rank"), hcfg.get("density"), hcfg.get("bits")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError("heal.rank", f"{rank!r} must be a positive integer")
    if not isinstance(density, int | float) or not 0 < density < 1:
        raise ConfigError("heal.density", f"{density!r} must be a fraction of entries in (0, 1)")
    if bits not in SUPPORTED_BITS:
        raise ConfigError("heal.bits", f"{bits!r} is not supported",
                          ["2..15 (integer codes)", "16 (fp16)", "32 (fp32)"])
    if hcfg.get("scheme") not in SCHEMES:
        raise ConfigError("heal.scheme", f"{hcfg.get('scheme')!r} is unknown", SCHEMES)


register("dsee", prepare=prepare, finish=finish, check=check)
