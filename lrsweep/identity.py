"""Run identity: a short hash of the config fields that define the experiment.

Launcher, logger, paths and the execution device are excluded, so the same experiment run
locally or on SLURM, with or without W&B, has the same ``run_id`` (and is not run twice).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrsweep.row import SCHEMA_VERSION

# top-level keys that do not change what is measured
EXCLUDED_KEYS = frozenset({"hydra", "logger", "launch", "results_dir", "cache_dir", "device", "verbose", "threads",
                           "sweep_name", "progress", "force"})


# top-level keys added after rows were first written, with the default that means "as before":
# left out of the hash while at that default, so existing rows keep their run_id
LATER_KEYS: dict[str, Any] = {"param_ratio": None, "allocation": "uniform"}


def experiment_config(cfg: DictConfig) -> dict[str, Any]:
    out = {}
    for key in cfg:
        if key in EXCLUDED_KEYS or (key in LATER_KEYS and cfg[key] == LATER_KEYS[key]):
            continue
        node = cfg[key]
        out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return out


def run_id(cfg: DictConfig) -> str:
    payload = json.dumps({"schema_version": SCHEMA_VERSION, **experiment_config(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


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
