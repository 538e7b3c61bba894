"""Config checks that run before any job is launched (over every grid point of a sweep).

Each check raises :class:`ConfigError` naming the key, the bad value and the valid values.
Checks that need the model's layer shapes use a weightless skeleton (meta device), built once
per model config in this process; tied weights (lm_head = embed_tokens) are one target there,
as they are one compressed matrix in the job.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from dataclasses import dataclass
from functools import lru_cache

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import allocate, cache, calib, disk, evaluate, heal, methods, models, schedule, seeds, spanning, tying
from lrsweep.compress import method_options, method_spec, resolve_rank
from lrsweep.errors import ConfigError
from lrsweep.methods import MethodSpec
from lrsweep.quant import SUPPORTED_BITS

# a user-given name (sweep_name) may become a W&B group or part of a path: plain characters only
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]*")


@dataclass(frozen=True)
class Target:
    """One weight that compression replaces, named by its leading target module."""

    shape: tuple[int, int]  # (n, d) of the weight: (out, in) of a Linear, (vocab, hidden) of an Embedding
    embedding: bool  # the leader is an nn.Embedding: its inputs are token ids
    tied: tuple[str, ...] = ()  # the other modules holding this weight (replaced with it)


def _replaceable(name: str, m: nn.Module) -> str | None:
    """Why module ``m`` cannot be replaced by a compressed one (None: it can)."""
    if not isinstance(m, models.TARGET_TYPES):
        return f"{name} ({type(m).__name__}) is not a Linear or Embedding module"
    if isinstance(m, nn.Embedding) and (type(m).forward is not nn.Embedding.forward or m.max_norm is not None):
        return f"{name} ({type(m).__name__}) computes more than a table lookup (its own forward or max_norm)"
    return None


def _from_skeleton(mcfg: DictConfig) -> dict[str, Target]:
    skel = models.skeleton(mcfg)
    try:
        layers = models.target_modules(skel, mcfg.targets)
    except re.error as e:
        raise ConfigError("model.targets", f"{mcfg.targets!r} is not a valid regex: {e}") from None
    if not layers:
        names = [n for n, m in skel.named_modules() if isinstance(m, models.TARGET_TYPES)]
        raise ConfigError("model.targets", f"{mcfg.targets!r} matches no Linear or Embedding module of {mcfg.name}",
                          names[:4] + ["..."] if len(names) > 4 else names)
    out: dict[str, Target] = {}
    for name, tied in tying.groups(skel, layers).items():  # tied targets fold into their leader
        for n in [name, *tied]:
            if reason := _replaceable(n, skel.get_submodule(n)):
                raise ConfigError("model.targets", f"{mcfg.targets!r} selects {name}, but {reason}")
        m = layers[name]
        out[name] = Target(tuple(m.weight.shape), isinstance(m, nn.Embedding), tuple(tied))
    return out


@lru_cache(maxsize=16)
def _targets(model_json: str, cache_dir: str) -> dict[str, Target]:
    """The targets of one model config, from its skeleton; kept on disk (``<cache_dir>/targets``)
    under the model config and the stamp of its config file, so later processes (every job and
    every sweep's planner) skip importing and building the model class."""
    mcfg = OmegaConf.create(json.loads(model_json))
    stamp = models.config_stamp(mcfg)
    if stamp is None or not cache_dir:
        return _from_skeleton(mcfg)
    return cache.json_value(
        cache_dir, "targets", {"version": 1, "model": model_json, "stamp": stamp},
        lambda: {n: {"shape": list(t.shape), "embedding": t.embedding, "tied": list(t.tied)}
                 for n, t in _from_skeleton(mcfg).items()},
        lambda value: {n: Target(tuple(t["shape"]), t["embedding"], tuple(t["tied"])) for n, t in value.items()})


def targets(cfg: DictConfig | dict[str, Any]) -> dict[str, Target]:
    """The weights ``model.targets`` compresses, by leading module (tied modules folded in), in model order.
    ``cfg``: a config, or a resolved one (lrsweep.identity.resolved)."""
    cache_dir = str(cfg.get("cache_dir") or "")
    model = cfg["model"] if isinstance(cfg, dict) else OmegaConf.to_container(cfg.model, resolve=True)
    return _targets(json.dumps(model, sort_keys=True), os.path.abspath(cache_dir) if cache_dir else "")


def check_embedding_method(name: str, spec: MethodSpec) -> None:
    """A method that needs statistics of a layer's inputs cannot compress an embedding (its inputs are ids)."""
    if spec.needs or spec.prepare is not None:
        free = sorted(n for n, s in methods.REGISTRY.items() if not s.needs and s.prepare is None)
        why = f"it needs calibration statistics {list(spec.needs)} of a layer's inputs" if spec.needs else \
            "it is trained on the calibration data through the layers' inputs"
        raise ConfigError("model.targets", f"selects the embedding {name}, which method {spec.name} cannot compress: "
                          f"{why} and an embedding's inputs are token ids (leave the embedding out of "
                          "model.targets, or use a data-free method)", free)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", str(device)):
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{device!r} requested but no CUDA device is available", ["auto", "cpu"])
        return device
    raise ConfigError("device", f"{device!r} is unknown", ["auto", "cpu", "cuda", "cuda:N"])


def check_results_dir(path: str, dry_run: bool = False) -> None:
    """ConfigError unless ``path`` can be written (lrsweep.disk.check_dir): made if missing and a file
    written in it; in a dry run, which writes nothing, only looked at."""
    disk.check_dir("results_dir", path, 0, write=not dry_run)


def check_name(key: str, value: object) -> None:
    if value is not None and (not PLAIN_NAME.fullmatch(str(value)) or ".." in str(value)):
        raise ConfigError(key, f"{value!r} is not a plain name (no path separators or '..')",
                          ["letters, digits and _ . = , + -"])


def validate(cfg: DictConfig, *, check_device: bool = True) -> None:
    """Raise ConfigError for the first problem of this grid point's config."""
    seeds.check(cfg)
    validate_experiment(cfg, check_device=check_device)


def validate_experiment(cfg: DictConfig, *, check_device: bool = True, resolved: dict[str, Any] | None = None
                        ) -> None:
    """:func:`validate` but for ``seed``, which nothing here reads: points that differ only in their seed
    pass or fail it alike (a sweep planner checks such a grid's points once and each seed alone).
    ``resolved``: the config resolved (lrsweep.identity.resolved) when the caller has it."""
    if cfg.model.get("kind") not in models.KINDS:
        raise ConfigError("model.kind", f"{cfg.model.get('kind')!r} is unknown", models.KINDS)
    models.model_dtype(cfg.model)
    seeds.check_count(cfg.get("seeds", 1))
    bits = cfg.bits
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ConfigError("bits", f"{bits!r} is not supported", ["2..15 (integer codes)", "16 (fp16)", "32 (fp32)"])
    rank = cfg.rank
    no_rank = not isinstance(rank, int) or isinstance(rank, bool) or rank < 1
    if cfg.budget is None and cfg.get("param_ratio") is None and no_rank:
        raise ConfigError("rank", f"{rank!r} must be a positive integer")
    if cfg.budget is not None and (not isinstance(cfg.budget, int | float) or cfg.budget <= 0):
        raise ConfigError("budget", f"{cfg.budget!r} must be a positive number of bits per weight or null")
    ratio = cfg.get("param_ratio")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ConfigError("param_ratio", f"{ratio!r} must be the fraction of each layer's parameters kept, "
                              "0 < param_ratio <= 1", ["null", "e.g. 0.8 (SVD-LLM's 'compression ratio 20%')"])
        if cfg.budget is not None:
            raise ConfigError("param_ratio", f"{ratio} given together with budget={cfg.budget}: set one of them",
                              ["param_ratio=null", "budget=null"])
    spec = method_spec(cfg.method)
    opts = method_options(cfg.method)
    spec.parse(opts)  # unknown keys and values of the wrong type
    task = cfg.eval.task
    if task != "auto" and task not in evaluate.TASKS:
        raise ConfigError("eval.task", f"{task!r} is unknown", ["auto", *sorted(evaluate.TASKS)])
    evaluate.task_for(cfg).check(cfg)
    evaluate.retrieval.check(cfg)
    evaluate.check_inference(cfg)
    calib.check(cfg, spec.needs)
    heal.check(cfg)
    missing = [s for s in spec.needs if s not in methods.STAT_KINDS]
    if missing:
        raise ConfigError("method.needs", f"unknown statistics {missing}", methods.STAT_KINDS)
    if spec.needs and not cfg.get("calib"):
        raise ConfigError("calib", f"method {spec.name} needs calibration statistics {list(spec.needs)} "
                          "but no calibration data is configured", ["+calib=default", "+calib=<name>"])
    check_name("sweep_name", cfg.get("sweep_name"))
    if check_device:
        resolve_device(str(cfg.device))
    check_results_dir(os.path.abspath(str(cfg.results_dir)), bool(cfg.get("dry_run")))
    layers = targets(resolved if resolved is not None else cfg)
    for name, target in layers.items():
        if target.embedding:
            check_embedding_method(name, spec)
    schedule.check(cfg, spec, opts)
    spanning.check(cfg, spec, opts, {name: t.shape for name, t in layers.items() if not t.embedding})
    allocate.check(cfg, spec, opts, {name: t.shape for name, t in layers.items()})
    for name, target in layers.items():
        try:
            resolve_rank(spec, *target.shape, rank, bits, cfg.budget, opts, ratio)
        except ConfigError as e:
            raise ConfigError(e.key, f"{str(e).split(': ', 1)[1]} (layer {name})") from None


class StopLaunch(BaseException):
    """A ConfigError leaving a Hydra callback (Hydra turns a callback's Exception into a warning)."""

    def __init__(self, error: ConfigError):
        super().__init__(str(error))
        self.error = error


class ValidateCallback(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): a single run is validated before
    Hydra creates its output dir, and a sweep's results_dir is checked before the sweep dir is
    made (its grid points are validated by the launcher), so a bad config leaves nothing behind."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        try:
            validate(config)
        except ConfigError as e:
            raise StopLaunch(e) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        try:
            check_results_dir(os.path.abspath(str(config.results_dir)), bool(config.get("dry_run")))
        except ConfigError as e:
            raise StopLaunch(e) from None
