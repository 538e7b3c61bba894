"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The content goes to a unique temp file in the target's directory (``.<name>.<random>.tmp``),
is flushed and fsynced, and replaces the target with ``os.replace``; the directory is then
fsynced (where the platform allows) so the rename survives a crash. On any exception the temp
file is removed and the target is left as it was.

The read side: :func:`read_json` gives a file's JSON, or None when the file is missing or damaged
(cut short, not JSON, rejected by the caller's check); a damaged file is reported by
:func:`damaged`, the one warning line naming its path that every reader of rows, manifests and cache
entries uses.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_reported: set[tuple[str, int, int]] = set()  # (path, size, mtime) of the damaged files reported in this process


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # some platforms cannot open a directory: the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; whatever is written there replaces ``path`` on exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


def damaged(path: str | os.PathLike, what: str, why: str, then: str) -> None:
    """Report a damaged file in one warning line naming its path (once per process for one state of
    the file): ``[lrsweep] damaged <what> <path> (<why>): <then>``."""
    try:
        st = os.stat(path)
        state = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        state = (os.path.abspath(path), -1, -1)
    if state in _reported:
        return
    _reported.add(state)
    why = " ".join(str(why).split())
    log.warning(f"[lrsweep] damaged {what} {path} ({why[:200]}): {then}")


def read_json(path: str | os.PathLike, what: str, check: Callable[[Any], T] = lambda value: value,
              then: str = "ignored") -> T | None:
    """``check`` of the JSON in ``path``; None when there is no such file, or when it is damaged
    (unreadable, not JSON, or ``check`` raises ValueError / TypeError / KeyError): then reported by
    :func:`damaged` as ``what`` with ``then`` saying what the reader does instead."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no such file (a parent that is a file: neither)
        return None
    except OSError as e:
        damaged(path, what, f"unreadable: {e.strerror or e}", then)
        return None
    try:
        value = json.loads(data)
    except ValueError as e:
        damaged(path, what, f"not JSON: {e}", then)
        return None
    try:
        return check(value)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        damaged(path, what, f"not a {what}: {type(e).__name__}: {e}", then)
        return None
