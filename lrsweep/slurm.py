"""The SLURM job this process runs in, as ``squeue``/``sacct`` and the sweep manifests name it."""

from __future__ import annotations

import os
from collections.abc import Mapping


def job_id(env: Mapping[str, str] | None = None) -> str | None:
    """``<array job>_<task>`` in an array task (``123_4``), the job id in a plain job, None outside SLURM."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID')}"
    return env.get("SLURM_JOB_ID")


def array_index(env: Mapping[str, str] | None = None) -> str | None:
    """The task index in an array task, None otherwise."""
    return (os.environ if env is None else env).get("SLURM_ARRAY_TASK_ID")
