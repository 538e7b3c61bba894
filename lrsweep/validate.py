"""Config checks that run before any job is launched (over every grid point of a sweep).

Each check raises :class:`ConfigError` naming the key, the bad value and the valid values.
Checks that need the model's layer shapes use a weightless skeleton (meta device), built once
per model config in this process.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lrsweep import calib, evaluate, heal, methods, models
from lrsweep.compress import method_options, method_spec, resolve_rank
from lrsweep.errors import ConfigError
from lrsweep.quant import SUPPORTED_BITS

# a user-given name (sweep_name) may become a W&B group or part of a path: plain characters only
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]*")


@lru_cache(maxsize=16)
def _layer_shapes(model_json: str) -> dict[str, tuple[int, int]]:
    mcfg = OmegaConf.create(json.loads(model_json))
    skel = models.skeleton(mcfg)
    try:
        layers = models.target_linears(skel, mcfg.targets)
    except re.error as e:
        raise ConfigError("model.targets", f"{mcfg.targets!r} is not a valid regex: {e}") from None
    if not layers:
        linears = [n for n, m in skel.named_modules() if isinstance(m, torch.nn.Linear)]
        raise ConfigError("model.targets", f"{mcfg.targets!r} matches no Linear module of {mcfg.name}",
                          linears[:4] + ["..."] if len(linears) > 4 else linears)
    return {n: tuple(m.weight.shape) for n, m in layers.items()}


def layer_shapes(cfg: DictConfig) -> dict[str, tuple[int, int]]:
    return _layer_shapes(json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True))


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


def check_results_dir(path: str) -> None:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".probe-"):
            pass
    except OSError as e:
        raise ConfigError("results_dir", f"{path!r} is not writable ({e.strerror})") from None


def check_name(key: str, value: object) -> None:
    if value is not None and (not PLAIN_NAME.fullmatch(str(value)) or ".." in str(value)):
        raise ConfigError(key, f"{value!r} is not a plain name (no path separators or '..')",
                          ["letters, digits and _ . = , + -"])


def validate(cfg: DictConfig, *, check_device: bool = True) -> None:
    """Raise ConfigError for the first problem of this grid point's config."""
    if cfg.model.get("kind") not in models.KINDS:
        raise ConfigError("model.kind", f"{cfg.model.get('kind')!r} is unknown", models.KINDS)
    models.model_dtype(cfg.model)
    bits = cfg.bits
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ConfigError("bits", f"{bits!r} is not supported", ["2..15 (integer codes)", "16 (fp16)", "32 (fp32)"])
    rank = cfg.rank
    if cfg.budget is None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError("rank", f"{rank!r} must be a positive integer")
    if cfg.budget is not None and (not isinstance(cfg.budget, int | float) or cfg.budget <= 0):
        raise ConfigError("budget", f"{cfg.budget!r} must be a positive number of bits per weight or null")
    spec = method_spec(cfg.method)
    opts = method_options(cfg.method)
    accepted = spec.options()
    if accepted is not None and set(opts) - accepted:
        bad = sorted(set(opts) - accepted)[0]
        raise ConfigError(f"method.{bad}", f"is not an option of method {spec.name}", sorted(accepted) or ["(none)"])
    task = cfg.eval.task
    if task != "auto" and task not in evaluate.TASKS:
        raise ConfigError("eval.task", f"{task!r} is unknown", ["auto", *sorted(evaluate.TASKS)])
    evaluate.task_for(cfg).check(cfg)
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
    check_results_dir(os.path.abspath(str(cfg.results_dir)))
    for name, (n, d) in layer_shapes(cfg).items():
        try:
            resolve_rank(spec, n, d, rank, bits, cfg.budget, opts)
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
            check_results_dir(os.path.abspath(str(config.results_dir)))
        except ConfigError as e:
            raise StopLaunch(e) from None
