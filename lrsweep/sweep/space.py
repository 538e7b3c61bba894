"""Where a sweep writes, checked before launch, and what it says when a disk fills up while it runs.

:func:`preflight`: the results dir, its ``rows/``, the cache dir, the W&B dir and the job folder
(submitit's) are directories this process can write to, with room for a row and a job's pickle;
anything else is a ConfigError (exit 2, one line naming the key and the path) before any job is
submitted. A dry run checks the same without writing anything (no probe file, no directory made).

:func:`no_space`: an OSError of a full disk (ENOSPC, EDQUOT) as one line naming the path and its free
space; the sweep then writes failed rows where it still can and exits 1 (lrsweep.sweep.outcome).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from lrsweep.errors import ConfigError

FULL = (errno.ENOSPC, errno.EDQUOT)
ROW_ROOM = 64 * 1024  # bytes a row (JSON, with a traceback of at most a few KB) may need


def is_full(e: BaseException) -> bool:
    """Whether ``e`` is a write refused for want of space (disk full or quota exceeded)."""
    return isinstance(e, OSError) and e.errno in FULL


def existing(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else its nearest existing ancestor."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem of ``path`` (of its nearest existing ancestor); None if unknown."""
    try:
        return shutil.disk_usage(existing(path)).free
    except OSError:
        return None


def size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def no_space(e: OSError, fallback: str | os.PathLike | None = None) -> str:
    """One line: the path a full disk refused and the free space there."""
    path = e.filename or fallback or "?"
    return f"no space left on device writing {path} ({size(free_bytes(path))} free there)"


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


def check(key: str, path: str, room: int, write: bool) -> None:
    """ConfigError unless ``path`` is (or can be made) a writable directory with ``room`` bytes free;
    ``write``: make it and write a probe file there (else only look, for a dry run)."""
    p = Path(os.path.abspath(path))
    found = existing(p)
    if not found.is_dir():
        what = "is a file" if found == p else f"is under {str(found)!r}, which is a file"
        raise ConfigError(key, f"{path!r} {what}, not a directory", ["a writable directory"])
    if not os.access(found, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{path!r} is not writable (permission denied on {str(found)!r})",
                          ["a writable directory"])
    free = free_bytes(found)
    if free is not None and free < room:
        raise ConfigError(key, f"{path!r} has {size(free)} free; a sweep needs at least {size(room)} there "
                          "(a row and a job's pickle)", ["free some space", "another directory"])
    if not write:
        return
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".lrsweep-probe-") as f:
            f.write(b"\0" * min(room, 1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        why = f"{size(free_bytes(p))} free" if is_full(e) else (e.strerror or str(e))
        raise ConfigError(key, f"{path!r} is not writable ({why})", ["a writable directory"]) from None


def preflight(points: list[Any], params: dict[str, Any], job_bytes: int, write: bool) -> None:
    """:func:`check` every directory the sweep writes to (:func:`where`), with room for a row and
    ``job_bytes`` (a job's pickle) in each."""
    for key, path in where(points, params):
        check(key, path, ROW_ROOM + job_bytes, write)


def pickle_bytes(objs: Iterable[Any]) -> int:
    """The size of a job's pickle as submitit writes it (cloudpickle)."""
    import cloudpickle

    return len(cloudpickle.dumps(tuple(objs)))
