"""Directories and full disks: whether a directory can take what a run writes, and one line for a
write a full disk refused.

:func:`check_dir`: a path is (or can be made) a directory this process can write to, with room for
``room`` bytes; anything else is a ConfigError naming the config key and the path (exit 2). Without
``write`` (a dry run) it only looks: no probe file, no directory made.

:func:`no_space`: an OSError of a full disk (ENOSPC, EDQUOT) as one line naming the path and its free
space.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from lrsweep.errors import ConfigError

FULL = (errno.ENOSPC, errno.EDQUOT)


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


def read_only(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on a filesystem mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False


def check_dir(key: str, path: str, room: int, write: bool) -> None:
    """ConfigError unless ``path`` is (or can be made) a writable directory with ``room`` bytes free;
    ``write``: make it and write a probe file there (else only look, for a dry run)."""
    p = Path(os.path.abspath(path))
    found = existing(p)
    if not found.is_dir():
        what = "is a file" if found == p else f"is under {str(found)!r}, which is a file"
        raise ConfigError(key, f"{path!r} {what}, not a directory", ["a writable directory"])
    if not os.access(found, os.W_OK | os.X_OK):
        why = "a read-only filesystem at" if read_only(found) else "permission denied on"
        raise ConfigError(key, f"{path!r} is not writable ({why} {str(found)!r})", ["a writable directory"])
    free = free_bytes(found)
    if free is not None and free < room:
        raise ConfigError(key, f"{path!r} has {size(free)} free; a sweep needs at least {size(room)} there "
                          "(a row and a job's pickle)", ["free some space", "another directory"])
    if not write:
        return
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".lrsweep-probe-") as f:
            if room:
                f.write(b"\0" * min(room, 1 << 20))
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        why = f"{size(free_bytes(p))} free" if is_full(e) else (e.strerror or str(e))
        raise ConfigError(key, f"{path!r} is not writable ({why} {str(found)!r})", ["a writable directory"]) from None
