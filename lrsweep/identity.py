"""Run identity: a short hash of the config that defines the experiment, and what a packed job shares.

The run_id hashes every top-level key of the config but those in :data:`NOT_EXPERIMENT`, with the
row schema's version (lrsweep.row.SCHEMA_VERSION), so the same experiment run locally or on SLURM,
with or without W&B, has the same ``run_id`` and is not run twice. The device enters as its type
(cpu / cuda: latency and memory are measured on it; which GPU stays in the row). ``device=auto`` is
the type the job will use: ``auto_device`` when the caller knows it (a sweep planning jobs that run
elsewhere passes what its launcher requests), else this machine's (cuda when available).

Rows written under another schema version are moved to their run_id now by
``python -m lrsweep.rekey <results_dir>`` (lrsweep.rekey).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrsweep.row import SCHEMA_VERSION

# What is not part of an experiment: keys whose value changes nothing a row measures, each with why.
# Dotted keys are nested ones (calib.fisher: under the condition its reason gives).
NOT_EXPERIMENT: dict[str, str] = {
    "hydra": "Hydra's own settings: output dirs, launcher, sweeper",
    "logger": "where the row is sent besides its file (W&B or nowhere)",
    "results_dir": "where the row is written",
    "cache_dir": "where models, data and calibration statistics are cached",
    "threads": "torch threads of the job (by default the launcher's cpus_per_task): local and SLURM runs are one "
               "experiment",
    "sweep_name": "the W&B group the launcher names the sweep by",
    "seeds": "how many seeds a sweep gives a randomized method: each seed is its own run",
    "progress": "progress bars",
    "verbose": "tracebacks of config errors",
    "force": "reruns a point whose row is ok",
    "dry_run": "lists the points and runs none",
    "save_compressed": "also writes the compressed model's factors next to the row",
    "calib.fisher": "the Fisher estimator, for methods that use no Fisher (part of the experiment of those that do)",
    "eval.retrieval": "the retrieval evaluation's settings while it is off (eval.retrieval.queries=0; part of the "
                      "experiment when it is on)",
}

# What does not change the dense model (its weights, data, calibration and what is measured on it):
# points differing only in these share one dense model in a packed job (dense_key). So do the keys
# that are not part of the experiment, but threads (the dense model is timed with them) and cache_dir
# (it is read from there); the device counts with its index (the job's one device).
NOT_DENSE_MODEL: dict[str, str] = {
    "method": "how the dense weights are compressed",
    "rank": "the rank of the factors",
    "bits": "the bits of stored factor entries",
    "budget": "bits per weight, which set each layer's rank",
    "param_ratio": "the fraction of each layer's parameters kept, which sets its rank",
    "allocation": "how ranks are spread across layers",
    "heal": "the fine-tune after compression",
    "inference": "how compressed layers run (falling back to dense)",
    "stream": "whether blocks are compressed one at a time",
    **{key: why for key, why in NOT_EXPERIMENT.items() if "." not in key and key not in ("threads", "cache_dir")},
}


def device_type(cfg: DictConfig, auto_device: str | None = None) -> str:
    """cpu or cuda: the type of device the grid point runs on (cuda:1 is cuda); ``device=auto`` is
    ``auto_device`` when given, else this machine's."""
    return _device_type(str(cfg.get("device", "cpu")), auto_device)


def _device_type(device: str, auto_device: str | None) -> str:
    if device == "auto":
        if auto_device is not None:
            return auto_device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config without Hydra's node, interpolations resolved, as plain dicts and lists."""
    return {key: _plain(cfg[key]) for key in cfg if key != "hydra"}


def experiment_config(cfg: DictConfig, auto_device: str | None = None) -> dict[str, Any]:
    """The config as the run_id hashes it: without :data:`NOT_EXPERIMENT`, the device as its type, a
    built-in method by its name (a ``_target_`` naming the built-in's own function is that built-in)."""
    return experiment_of({key: _plain(cfg[key]) for key in cfg if key not in NOT_EXPERIMENT},
                         device_type(cfg, auto_device))


def experiment_of(config: dict[str, Any], device: str) -> dict[str, Any]:
    """:func:`experiment_config` of a resolved config (:func:`resolved`), ``device`` its type."""
    out = {key: value for key, value in config.items() if key not in NOT_EXPERIMENT}
    out["device"] = device
    method = out.get("method")
    if isinstance(method, dict) and "_target_" in method:
        from lrsweep.methods import REGISTRY

        spec = REGISTRY.get(str(method.get("name")))
        if spec is not None and spec.builtin and method["_target_"] == spec.target:
            out["method"] = {k: v for k, v in method.items() if k != "_target_"}
    if isinstance(out.get("calib"), dict) and "fisher" not in _needs(config.get("method")):
        out["calib"] = {k: v for k, v in out["calib"].items() if k != "fisher"}
    if isinstance(out.get("eval"), dict) and not (out["eval"].get("retrieval") or {}).get("queries"):
        out["eval"] = {k: v for k, v in out["eval"].items() if k != "retrieval"}  # rows from before it keep their id
    return out


def _needs(method: Any) -> tuple[str, ...]:
    """The calibration statistics of a method config (all of them when it cannot be resolved)."""
    from lrsweep.compress import method_spec
    from lrsweep.errors import ConfigError

    try:
        return method_spec(method).needs
    except (ConfigError, AttributeError):
        return ("fisher",)


def digest(experiment: dict[str, Any]) -> str:
    """The run_id of an experiment config (:func:`experiment_config`)."""
    payload = json.dumps({"schema_version": SCHEMA_VERSION, **experiment}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def run_id(cfg: DictConfig, auto_device: str | None = None) -> str:
    return digest(experiment_config(cfg, auto_device))


def run_id_of(config: dict[str, Any], auto_device: str | None = None) -> str:
    """:func:`run_id` of a resolved config (:func:`resolved`)."""
    return digest(experiment_of(config, _device_type(str(config.get("device", "cpu")), auto_device)))


def run_name(cfg: DictConfig, auto_device: str | None = None) -> str:
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
    parts += [f"b{cfg.bits}", f"s{cfg.seed}", run_id(cfg, auto_device)]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))


def dense_key(cfg: DictConfig) -> str:
    """What the dense model, its metrics and calibration depend on: points with the same key share them."""
    return dense_key_of({key: _plain(cfg[key]) for key in cfg if key not in NOT_DENSE_MODEL})


def dense_key_of(config: dict[str, Any]) -> str:
    """:func:`dense_key` of a resolved config (:func:`resolved`)."""
    return json.dumps({key: value for key, value in config.items() if key not in NOT_DENSE_MODEL}, sort_keys=True,
                      default=str)
