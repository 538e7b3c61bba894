"""A content-keyed disk cache shared by concurrent jobs.

An entry is a safetensors file of tensors plus JSON metadata, named by the hash of
everything it depends on (the full key is stored inside and checked on load). The first job
computes it under a file lock and writes it atomically; the others wait and read it. Work that
splits into independent parts (:func:`shared_parts`) is shared instead: each job computes the
parts no other job holds, then reads the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from lrsweep import atomic

T = TypeVar("T")


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _path(cache_dir: str | os.PathLike, namespace: str, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / namespace / f"{digest(key)}.safetensors"


def _read(path: Path, key: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lrsweep"])
    if meta["key"] != json.loads(json.dumps(key, sort_keys=True, default=str)):
        raise RuntimeError(f"cache entry {path} was written for another key")
    return load_file(str(path)), meta["info"]


def get_or_compute(cache_dir: str | os.PathLike, namespace: str, key: dict[str, Any],
                   compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]], wait: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool] | None:
    """(tensors, info, hit): read the entry for ``key`` or compute it once (locked). ``wait=False``:
    None instead of waiting when another process holds the entry's lock (is computing it)."""
    path = _path(cache_dir, namespace, key)
    found = _read(path, key)
    if found is not None:
        return (*found, True)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    try:
        found = _read(path, key)  # written while this process waited for the lock
        if found is not None:
            return (*found, True)
        tensors, info = compute()
        meta = {"lrsweep": json.dumps({"key": key, "info": info}, sort_keys=True, default=str)}
        with atomic.replacing(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        return tensors, json.loads(json.dumps(info, default=str)), False
    finally:
        lock.release()


def read(cache_dir: str | os.PathLike, namespace: str, key: dict[str, Any]
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, info) of the entry for ``key``, None when there is none yet."""
    return _read(_path(cache_dir, namespace, key), key)


def shared_parts(cache_dir: str | os.PathLike, namespace: str, key: dict[str, Any], n: int,
                 compute: Callable[[int], dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The tensors of the ``n`` independent parts of one computation, each part an entry (``key``
    with its index). A process computes, in order, every part that is not written yet and that no
    other process holds (``get_or_compute`` without waiting), then reads the parts that were held,
    waiting for them (or computing one whose holder died: the lock dies with its process). Sibling
    jobs that need the same cold entry at once so split its work between them; alone, a process
    computes every part."""
    def part(i: int, wait: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool] | None:
        return get_or_compute(cache_dir, namespace, {**key, "part": i, "parts": n}, lambda: (compute(i), {}), wait)

    out = {i: part(i, wait=False) for i in range(n)}
    return [(found or part(i, wait=True))[0] for i, found in out.items()]  # type: ignore[index]


def json_value(cache_dir: str | os.PathLike, namespace: str, key: dict[str, Any], compute: Callable[[], Any],
               load: Callable[[Any], T] = lambda value: value) -> T:
    """``load`` of a small JSON value kept at ``<cache_dir>/<namespace>/<digest(key)>.json``: read when
    it is there and ``load`` takes it, else ``compute``d and written atomically (unlocked: two
    processes may both compute it; a read-only cache only costs computing it again)."""
    path = Path(cache_dir) / namespace / f"{digest(key)}.json"
    try:
        return load(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    try:
        atomic.write_json(path, value, indent=None)
    except OSError:
        pass
    return load(value)
