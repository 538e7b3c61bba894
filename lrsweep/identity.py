"""Run identity: a short hash of the config fields that define the experiment.

Launcher, logger and paths are excluded, so the same experiment run locally or on SLURM, with
or without W&B, has the same ``run_id`` (and is not run twice). The device enters as its type
(cpu / cuda: latency and memory are measured on it; the GPU's name stays in the row), and only
when it is not cpu, so rows written before the device type was part of the id keep theirs.
``device=auto`` counts as the type the job will use: this machine's (cuda when available), or,
while a sweep plans jobs that run elsewhere (:func:`auto_device`), what the launcher requests.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from lrsweep.row import SCHEMA_VERSION

# top-level keys that do not change what is measured (device: only its type, see device_type)
EXCLUDED_KEYS = frozenset({"hydra", "logger", "launch", "results_dir", "cache_dir", "device", "verbose", "threads",
                           "sweep_name", "progress", "force", "dry_run"})

# top-level keys that change no measurement but were hashed when rows were first written: hashed at
# this value whatever they are set to, so the id neither changes with them nor for the rows written before
NEUTRAL_KEYS: dict[str, Any] = {"save_compressed": False}  # the factors saved next to the row


# keys (dotted paths) added after rows were first written, with the default that means "as before":
# left out of the hash while at that default, so existing rows keep their run_id
LATER_KEYS: dict[str, Any] = {"param_ratio": None,
                              "eval.ppl_drop_last": False, "eval.ppl_bos": False,  # perplexity protocol
                              "calib.sampling": "stream", "calib.bos": False,  # calibration protocol
                              "calib.fisher": "batch",  # the Fisher estimator before per-sample became the default
                              "allocation": "uniform",  # rank allocation across layers
                              "method.solver": "exact",  # asvd: torch.svd_lowrank as in ASVD's code
                              "method.side": "output", "method.power": 0.5,  # fwsvd: the weighted side
                              "method.grid": "narrow", "method.observer": "absmax"}  # the quantizer's scales


def _drop_later_defaults(out: dict[str, Any]) -> None:
    for path, default in LATER_KEYS.items():
        *parents, leaf = path.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            del node[leaf]


# what device=auto resolves to for the ids of this process; None: this machine's device
_AUTO: list[str | None] = [None]


@contextmanager
def auto_device(kind: str | None) -> Iterator[None]:
    """Resolve ``device=auto`` to ``kind`` (cpu / cuda) meanwhile: a sweep plans on one machine for jobs
    that see the devices their launcher requests."""
    _AUTO.append(kind)
    try:
        yield
    finally:
        _AUTO.pop()


def device_type(cfg: DictConfig) -> str:
    """cpu or cuda: the type of device the grid point runs on (cuda:1 is cuda)."""
    device = str(cfg.get("device", "cpu"))
    if device == "auto":
        if _AUTO[-1] is not None:
            return _AUTO[-1]
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def experiment_config(cfg: DictConfig) -> dict[str, Any]:
    out = {}
    for key in cfg:
        if key in EXCLUDED_KEYS:
            continue
        node = cfg[key]
        out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    for key, value in NEUTRAL_KEYS.items():
        if key in out:
            out[key] = value
    _drop_later_defaults(out)
    if device_type(cfg) != "cpu":  # cpu is the identity rows had before the device type was part of it
        out["device"] = device_type(cfg)
    if isinstance(out.get("method"), dict):
        _name_builtin_target(out["method"])
    if isinstance(out.get("calib"), dict) and "fisher" not in _needs(cfg):
        out["calib"].pop("fisher", None)  # the Fisher estimator identifies only runs that use a Fisher
    return out


def _name_builtin_target(method: dict[str, Any]) -> None:
    """Hash a built-in method config (``name`` and options, no ``_target_``) with the ``_target_`` it
    carried until built-ins were known by name alone: the import path of the built-in's function,
    so ids computed before stay valid (and a row written before, which records that ``_target_``,
    keeps its id)."""
    from lrsweep.methods import REGISTRY

    spec = REGISTRY.get(str(method.get("name")))
    if spec is not None and spec.builtin and "_target_" not in method:
        method["_target_"] = spec.target


def _needs(cfg: DictConfig) -> tuple[str, ...]:
    """The calibration statistics of the configured method (all of them when it cannot be resolved)."""
    from lrsweep.compress import method_spec
    from lrsweep.errors import ConfigError

    try:
        return method_spec(cfg.method).needs
    except ConfigError:
        return ("fisher",)


def digest(experiment: dict[str, Any]) -> str:
    """The run_id of an experiment config (:func:`experiment_config`)."""
    payload = json.dumps({"schema_version": SCHEMA_VERSION, **experiment}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def run_id(cfg: DictConfig) -> str:
    return digest(experiment_config(cfg))


def run_name(cfg: DictConfig) -> str:
    """A readable name: model-method-(r<rank>|bpw<budget>|p<param_ratio>)-b<bits>-s<seed>-<run_id>."""
    parts = [str(cfg.model.name), str(cfg.method.name)]
    if cfg.get("budget") is not None:
        parts.append(f"bpw{cfg.budget}")
    elif cfg.get("param_ratio") is not None:
        parts.append(f"p{cfg.param_ratio}")
    else:
        parts.append(f"r{cfg.rank}")
    if cfg.get("allocation", "uniform") != "uniform":
        parts.append(str(cfg.allocation))
    parts += [f"b{cfg.bits}", f"s{cfg.seed}", run_id(cfg)]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))
