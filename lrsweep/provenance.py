"""Where a row comes from: the code's commit, package versions, the dense weights' identity, and the
submitit / SLURM job that ran it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrsweep import models, slurm


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit of the lrsweep checkout ("" outside one), looked up once a process."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    """Python's and the main packages' versions (looked up once a process)."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lrsweep", "torch", "transformers", "datasets", "hydra-core", "submitit", "wandb"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def model_key(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the dense weights: resolved path, a hash of the weight files, dtype."""
    if cfg.model.get("random_init"):  # seeded random weights: the config and seed are the identity
        return {"random_init": OmegaConf.to_container(cfg.model, resolve=True)}
    path = Path(models.resolve_path(cfg.model))
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".gguf", ".bin"):
                h.update(f.name.encode() + str(f.stat().st_size).encode())
                with open(f, "rb") as fh:  # first and last MiB: cheap and changes with the file
                    h.update(fh.read(1 << 20))
                    fh.seek(max(0, f.stat().st_size - (1 << 20)))
                    h.update(fh.read())
    return {"path": str(path), "gguf_file": cfg.model.get("gguf_file"), "revision": cfg.model.get("revision"),
            "weights": h.hexdigest()[:16], "dtype": cfg.model.dtype}


def submitit_job() -> Any:
    """The submitit JobEnvironment of this process, None outside a submitit job."""
    if os.environ.get("SUBMITIT_FOLDER") and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment()
    return None


def job_fields(row: Any) -> None:
    """The row's SLURM job, array index and log file."""
    row.slurm_job_id, row.slurm_array_index = slurm.job_id(), slurm.array_index()
    env = submitit_job()
    if env is not None:
        row.log_path = str(env.paths.stdout)


def job_id() -> str:
    """This process's submitit job id (SLURM or local), else its pid."""
    env = submitit_job()
    return str(env.job_id) if env is not None else f"pid {os.getpid()}"
