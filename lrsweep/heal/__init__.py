"""Healing after compression: a short distillation from the dense model into the compressed one.

A healer is one file in this package plus ``conf/heal/<name>.yaml``, registered in ``HEALERS``.
It says which tensors train and how they will be stored (``prepare``: :class:`Trained`) and
what becomes of them afterwards (``finish``):
  distill  the tensors the factorizations store (L, R, ...) train and are re-quantized;
  dsee     the compressed model is frozen; each Linear learns dW = U V + S, stored afterwards.
The loop is shared (:func:`apply`): batches of ``heal.data`` (a calibration config, read by the
source of the model kind: :mod:`lrsweep.calib.sources`), the teacher is the same model with its
original modules swapped back in (no second copy of the model), and the loss depends on the model
kind (``LOSSES``).
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lrsweep.calib.sources import SOURCES
from lrsweep.compress import LayerResult
from lrsweep.context import Context
from lrsweep.errors import ConfigError


@dataclass(frozen=True)
class Trained:
    """A model parameter that trains, and the values its stored tensor will hold (``quantize``)."""

    param: nn.Parameter
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: stored as it is


@dataclass(frozen=True)
class Healer:
    name: str
    # (model, layer results, original modules, heal config) -> what trains (may install modules)
    prepare: Callable[[nn.Module, list[LayerResult], dict[str, nn.Module], DictConfig], list[Trained]]
    # (model, layer results, original modules, heal config) -> row info; updates results in place
    finish: Callable[[nn.Module, list[LayerResult], dict[str, nn.Module], DictConfig], dict[str, Any]]
    check: Callable[[DictConfig], None] | None = None  # raise ConfigError for bad options


HEALERS: dict[str, Healer] = {}


def register(name: str, *, prepare, finish, check=None) -> None:
    HEALERS[name] = Healer(name, prepare, finish, check)


# ---------------------------------------------------------------- teacher = the model with its originals
def snapshot(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by name (references only): taken before compression."""
    return dict(model.named_modules())


def replaced(before: dict[str, nn.Module], model: nn.Module) -> dict[str, nn.Module]:
    """name -> original module, for every module that compression replaced (outermost ones)."""
    now = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name, old in before.items():
        if name and name in now and now[name] is not old and not any(name.startswith(p + ".") for p in out):
            out[name] = old
    return out


@contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily put ``modules`` (name -> module) into ``model``."""
    from lrsweep.models import set_module

    current = {name: model.get_submodule(name) for name in modules}
    for name, m in modules.items():
        set_module(model, name, m)
    try:
        yield
    finally:
        for name, m in current.items():
            set_module(model, name, m)


# ---------------------------------------------------------------- distillation losses by model kind
def _mask(batch: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones(shape, dtype=torch.bool, device=batch["input_ids"].device)


def logits_kl(student: Any, teacher: Any, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at ``temperature`` (x T^2), per real token."""
    s = torch.log_softmax(student.logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher.logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl[_mask(batch, kl.shape)].mean() * temperature**2


def hidden_mse(student: Any, teacher: Any, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """||h_student - h_teacher||^2 / ||h_teacher||^2 of the last hidden states over real tokens."""
    s, t = student.last_hidden_state.float(), teacher.last_hidden_state.float()
    mask = _mask(batch, s.shape[:-1])
    return ((s - t) ** 2).sum(-1)[mask].sum() / (t**2).sum(-1)[mask].sum().clamp(min=1e-12)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"causal_lm": logits_kl, "encoder": hidden_mse}
FORWARD_KWARGS: dict[str, dict[str, Any]] = {"causal_lm": {"use_cache": False}, "encoder": {}}


# ---------------------------------------------------------------- the shared loop
def batches(cfg: DictConfig, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """The training batches: ``heal.data`` read by the calibration source of the model kind."""
    out = SOURCES[cfg.model.kind].batches(cfg.heal.data, tokenizer)
    return [{k: v for k, v in b.items() if k != "labels"} for b in out]


class _Masters:
    """fp32 master copies of the trained parameters (the optimizer's; exact for bf16/fp16 models).
    Before each forward the model's parameters take their masters' values, quantized as they
    will be stored when ``qat`` (straight-through gradients), and their gradients go to the masters."""

    def __init__(self, trained: list[Trained], qat: bool):
        self.trained, self.qat = trained, qat
        self.masters = [t.param.detach().float().clone().requires_grad_(True) for t in trained]

    @torch.no_grad()
    def load(self, quantized: bool) -> None:
        for t, m in zip(self.trained, self.masters, strict=True):
            value = t.quantize(m) if quantized and t.quantize else m
            t.param.copy_(value.reshape(t.param.shape).to(t.param.dtype))

    def route_grads(self) -> None:
        for t, m in zip(self.trained, self.masters, strict=True):
            m.grad = t.param.grad.float().reshape(m.shape) if t.param.grad is not None else None
            t.param.grad = None


def apply(model: nn.Module, originals: dict[str, nn.Module], results: list[LayerResult],
          ctx: Context) -> dict[str, Any]:
    """Heal the compressed ``model`` by distillation from its ``originals``; returns the row's info.

    AdamW updates fp32 masters (:class:`_Masters`); at the end the model's parameters take their
    quantized values, which the healers store (with ``heal.qat`` the forward passes see them at
    every step). ``results`` must carry their factorizations; healers update them (and their
    rel_err and storage_bits) in place so the row describes the healed model. The originals (the
    teacher) are on ``ctx.device`` while it runs, and back where they waited afterwards
    (on CPU when compressed on a GPU: :func:`lrsweep.schedule.offload`).
    """
    homes = {name: p.device for name, m in originals.items() if (p := next(m.parameters(), None)) is not None}
    for name in homes:
        originals[name].to(ctx.device)
    try:
        return _apply(model, originals, results, ctx)
    finally:
        for name, home in homes.items():
            originals[name].to(home)


def _apply(model: nn.Module, originals: dict[str, nn.Module], results: list[LayerResult],
           ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    hcfg, kind = cfg.heal, cfg.model.kind
    healer = HEALERS[hcfg.name]
    t0 = time.perf_counter()
    data = batches(cfg, ctx.tokenizer)
    trained = healer.prepare(model, results, originals, hcfg)
    masters = _Masters(trained, bool(hcfg.get("qat", False)))
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for t in trained:
        t.param.requires_grad_(True)
    loss_fn, fwd = LOSSES[kind], FORWARD_KWARGS[kind]
    opt = torch.optim.AdamW(masters.masters, lr=float(hcfg.lr), weight_decay=float(hcfg.weight_decay)) \
        if trained else None
    curve: list[list[float]] = []
    torch.manual_seed(int(cfg.seed))
    try:
        for step in range(int(hcfg.steps) if opt else 0):
            batch = {k: v.to(ctx.device) for k, v in data[step % len(data)].items()}
            with torch.no_grad(), swapped(model, originals):
                teacher = model(**batch, **fwd)
            masters.load(quantized=masters.qat)
            loss = loss_fn(model(**batch, **fwd), teacher, batch, float(hcfg.temperature))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"heal loss became {loss.item()} at step {step} (lower heal.lr)")
            loss.backward()
            masters.route_grads()
            if hcfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(masters.masters, float(hcfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % int(hcfg.log_every) == 0 or step == int(hcfg.steps) - 1:
                curve.append([step, round(loss.item(), 6)])
        masters.load(quantized=True)  # the trained values, quantized: what the healers store
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved.get(n, False))
    info = {"name": healer.name, "steps": int(hcfg.steps), "lr": float(hcfg.lr), "qat": masters.qat,
            "batches": len(data),
            "trained_params": sum(t.param.numel() for t in trained), "loss_curve": curve,
            **healer.finish(model, results, originals, hcfg)}
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info


def check(cfg: DictConfig) -> None:
    """ConfigError (before launch) for heal settings that cannot work."""
    hcfg = cfg.get("heal")
    if not hcfg:
        return
    if hcfg.get("name") not in HEALERS:
        raise ConfigError("heal", f"{hcfg.get('name')!r} is unknown", sorted(HEALERS))
    if cfg.model.kind not in SOURCES:
        raise ConfigError("model.kind", f"healing has no training data for {cfg.model.kind!r}", sorted(SOURCES))
    for key in ("steps", "log_every"):
        v = hcfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "steps" else 1):
            raise ConfigError(f"heal.{key}", f"{v!r} must be an integer >= {0 if key == 'steps' else 1}")
    if not isinstance(hcfg.get("qat", False), bool):
        raise ConfigError("heal.qat", f"{hcfg.get('qat')!r} must be true or false", [True, False])
    for key in ("lr", "temperature"):
        v = hcfg.get(key)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"heal.{key}", f"{v!r} must be a positive number")
    if HEALERS[hcfg.name].check:
        HEALERS[hcfg.name].check(hcfg)


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
