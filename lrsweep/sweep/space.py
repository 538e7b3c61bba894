"""Where a sweep writes, checked before launch, and what it says when a disk fills up while it runs.

:func:`preflight`: the results dir, its ``rows/``, the cache dir, the W&B dir and the job folder
(submitit's) are directories this process can write to, with room for a row and a job's pickle;
anything else is a ConfigError (exit 2, one line naming the key and the path) before any job is
submitted. A dry run checks the same without writing anything (no probe file, no directory made).

A full disk while the sweep runs (lrsweep.disk.no_space): the sweep writes failed rows where it still
can and exits 1 (lrsweep.sweep.outcome).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lrsweep.disk import check_dir

ROW_ROOM = 64 * 1024  # bytes a row (JSON, with a traceback of at most a few KB) may need

# overrides that can move where a point writes (the keys, or the config groups that may set them)
MOVES = ("results_dir", "cache_dir", "logger", "experiment", "local", "hydra")


def where(points: list[Any], params: dict[str, Any]) -> list[tuple[str, str]]:
    """(config key, directory) the sweep writes to: results dir, rows/, cache, W&B dir, job folder.
    Read from the first point and each point with an override in :data:`MOVES` (resolving them
    costs ms a point: the others write where the first does)."""
    out: dict[str, str] = {}
    moved = [p for p in points[1:] if any(o.lstrip("+~").startswith(MOVES) for o in p.overrides)]
    for p in points[:1] + moved:
        results = p.results_dir
        out.setdefault(results, "results_dir")
        out.setdefault(os.path.join(results, "rows"), "results_dir")
        cache = p.get("cache_dir")
        if cache:
            out.setdefault(os.path.abspath(str(cache)), "cache_dir")
        wandb = (p.get("logger") or {}).get("dir")
        if wandb:
            out.setdefault(os.path.abspath(str(wandb)), "logger.dir")
    folder = params.get("submitit_folder")
    if folder:  # "<sweep dir>/.submitit/%j": the part before the job id
        parts = Path(str(folder)).parts
        cut = next((i for i, s in enumerate(parts) if "%" in s), len(parts))
        out.setdefault(os.path.abspath(os.path.join(*parts[:cut])), "hydra.launcher.submitit_folder")
    return [(key, path) for path, key in out.items()]


def preflight(points: list[Any], params: dict[str, Any], job_bytes: int, write: bool) -> None:
    """:func:`check` every directory the sweep writes to (:func:`where`), with room for a row and
    ``job_bytes`` (a job's pickle) in each."""
    for key, path in where(points, params):
        check_dir(key, path, ROW_ROOM + job_bytes, write)


def pickle_bytes(objs: Iterable[Any]) -> int:
    """The size of a job's pickle as submitit writes it (cloudpickle)."""
    import cloudpickle

    return len(cloudpickle.dumps(tuple(objs)))
