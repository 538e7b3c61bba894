"""A content-keyed disk cache shared by concurrent jobs.

An entry is a safetensors file of tensors plus JSON metadata, named by the hash of
everything it depends on (the full key is stored inside and checked on load). The first job
computes it under a file lock and writes it atomically; the others wait and read it. Work that
splits into independent parts (:func:`shared_parts`) is shared instead: each job computes the
parts no other job holds, then reads the rest.

Every entry is verified when read. A safetensors entry carries the sha256 of its own bytes in its
metadata (``lrsweep_sha256``, hashed with those 64 digits read as zeros), a JSON value (:func:`json_value`)
the same in its first field, and a folder (:func:`folder`: the dequantized model) a sealed manifest
of its files' sha256. An entry that fails the check (cut short, a block overwritten, unparseable
metadata, no checksum) is reported in one warning line naming its path (lrsweep.atomic.damaged),
removed and computed again: it is never used. Hashing costs about a second per GB read, against
minutes to compute an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from lrsweep import atomic

T = TypeVar("T")


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _path(cache_dir: str | os.PathLike, namespace: str, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / namespace / f"{digest(key)}.safetensors"


# ---------------------------------------------------------------- checksums
SEAL = "lrsweep_sha256"  # the metadata field (safetensors) / first field (JSON) holding an entry's sha256
_ZEROS = "0" * 64
DAMAGED = "removed; computing it again"


class Damaged(Exception):
    """A cache entry that fails its check (the message says how)."""


def _field(hexdigest: str) -> bytes:
    return f'"{SEAL}":"{hexdigest}"'.encode()


def _sha256(f: Any, head: bytes) -> str:
    """sha256 of ``head`` and the rest of the open file ``f``."""
    h = hashlib.sha256(head)
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def _header(f: Any, size: int) -> tuple[bytes, dict[str, Any]]:
    """(the first 8 bytes and the JSON header, the header parsed) of the safetensors file ``f``."""
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or 8 + n > size:
        raise Damaged(f"cut short or overwritten: {size} bytes, header length {n}")
    header = f.read(n)
    try:
        return head + header, json.loads(header)
    except ValueError as e:
        raise Damaged(f"unparseable metadata: {e}") from None


def _seal_safetensors(path: Path) -> None:
    """Write the sha256 of the file (its checksum field still zeros) into that field, in place."""
    with open(path, "r+b") as f:
        head, _ = _header(f, os.path.getsize(path))
        if head.count(_field(_ZEROS)) != 1:
            raise RuntimeError(f"{path}: no single {SEAL} field to seal")
        at = head.find(_field(_ZEROS))
        digest = _sha256(f, head)
        f.seek(at + len(_field(_ZEROS)) - 65)
        f.write(digest.encode())


def _verify_safetensors(path: Path) -> dict[str, Any]:
    """The ``lrsweep`` metadata of a safetensors entry whose bytes match its checksum; Damaged otherwise."""
    with open(path, "rb") as f:
        head, header = _header(f, os.fstat(f.fileno()).st_size)
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        claimed = meta.get(SEAL) if isinstance(meta, dict) else None
        if not isinstance(claimed, str) or head.count(_field(claimed)) != 1:
            raise Damaged("no checksum (written before lrsweep verified its cache)")
        offsets = [t.get("data_offsets") for t in header.values() if isinstance(t, dict)]
        end = len(head) + max((o[1] for o in offsets if isinstance(o, list) and len(o) == 2 and isinstance(o[1], int)),
                              default=0)
        size = os.fstat(f.fileno()).st_size
        if size != end:
            raise Damaged(f"{'cut short' if size < end else 'too long'}: {size} bytes of the {end} its header gives")
        if _sha256(f, head.replace(_field(claimed), _field(_ZEROS))) != claimed:
            raise Damaged("checksum mismatch: its bytes changed after it was written")
    try:
        return json.loads(meta["lrsweep"])
    except (KeyError, ValueError) as e:
        raise Damaged(f"unparseable metadata: {e}") from None


def _sealed_json(value: Any) -> bytes:
    """``{"lrsweep_sha256": <sha256 of this text with those digits zeros>, "value": value}``."""
    text = b"{" + _field(_ZEROS) + b',"value":' + json.dumps(value, default=str).encode() + b"}"
    return text.replace(_field(_ZEROS), _field(hashlib.sha256(text).hexdigest()), 1)


def _open_sealed_json(data: bytes) -> Any:
    """The value of :func:`_sealed_json`'s text when the text matches its checksum; Damaged otherwise."""
    start = len(b"{" + _field(_ZEROS)) - 65
    claimed = data[start:start + 64].decode("ascii", "replace")
    if not data.startswith(b"{" + _field(claimed)):
        raise Damaged("no checksum (written before lrsweep verified its cache)")
    if hashlib.sha256(data.replace(_field(claimed), _field(_ZEROS), 1)).hexdigest() != claimed:
        raise Damaged("checksum mismatch: its bytes changed after it was written")
    return json.loads(data)["value"]


def _remove(path: Path, why: str, what: str = "cache entry") -> None:
    """Report a damaged entry (one line naming it) and remove it."""
    from lrsweep import atomic

    atomic.damaged(path, what, why, DAMAGED)
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# ---------------------------------------------------------------- safetensors entries
def _read(path: Path, key: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The verified entry at ``path``; None when there is none; Damaged when it fails its check."""
    try:
        meta = _verify_safetensors(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Damaged(f"unreadable: {e.strerror or e}") from None
    if meta["key"] != json.loads(json.dumps(key, sort_keys=True, default=str)):
        raise RuntimeError(f"cache entry {path} was written for another key")
    try:
        return load_file(str(path)), meta["info"]
    except FileNotFoundError:  # replaced or removed by another process since the check
        return None
    except Exception as e:  # safetensors' own error for a file it cannot read
        raise Damaged(f"unreadable: {type(e).__name__}: {e}") from None


def _read_unlocked(path: Path, key: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """:func:`_read` outside the entry's lock: a damaged entry reads as None here (the caller then
    takes the lock, where it is reported, removed and computed again)."""
    try:
        return _read(path, key)
    except Damaged:
        return None


def get_or_compute(cache_dir: str | os.PathLike, namespace: str, key: dict[str, Any],
                   compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]], wait: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool] | None:
    """(tensors, info, hit): read the entry for ``key`` or compute it once (locked). ``wait=False``:
    None instead of waiting when another process holds the entry's lock (is computing it)."""
    path = _path(cache_dir, namespace, key)
    found = _read_unlocked(path, key)
    if found is not None:
        return (*found, True)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    try:
        try:
            found = _read(path, key)  # written while this process waited for the lock
        except Damaged as e:
            _remove(path, str(e))
            found = None
        if found is not None:
            return (*found, True)
        tensors, info = compute()
        meta = {"lrsweep": json.dumps({"key": key, "info": info}, sort_keys=True, default=str), SEAL: _ZEROS}
        with atomic.replacing(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
            _seal_safetensors(tmp)
        return tensors, json.loads(json.dumps(info, default=str)), False
    finally:
        lock.release()


def read(cache_dir: str | os.PathLike, namespace: str, key: dict[str, Any]
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, info) of the entry for ``key``, None when there is none yet (or it is damaged:
    :func:`get_or_compute` then reports, removes and computes it)."""
    return _read_unlocked(_path(cache_dir, namespace, key), key)


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
    """``load`` of a small JSON value kept at ``<cache_dir>/<namespace>/<digest(key)>.json``, with its
    checksum: read when it is there, verified and ``load`` takes it, else ``compute``d and written
    atomically (unlocked: two processes may both compute it; a read-only cache only costs computing
    it again). A damaged file is reported, removed and computed again."""
    path = Path(cache_dir) / namespace / f"{digest(key)}.json"
    try:
        return load(_open_sealed_json(path.read_bytes()))
    except Damaged as e:
        _remove(path, str(e))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or a value of an older shape
        pass
    value = compute()
    with contextlib.suppress(OSError):
        atomic.write_bytes(path, _sealed_json(value))
    return load(value)


# ---------------------------------------------------------------- folders
MANIFEST = ".lrsweep-sha256.json"  # a folder entry's files and their sha256, itself sealed


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256(f, b"")


def _verify_folder(root: Path) -> None:
    """Damaged unless every file of ``root``'s manifest is there with its sha256 (and the manifest is)."""
    try:
        listed = _open_sealed_json((root / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise Damaged("no checksum manifest (written before lrsweep verified its cache)") from None
    except (OSError, ValueError, KeyError) as e:
        raise Damaged(f"unreadable manifest: {e}") from None
    for name, sha in listed.items():
        try:
            if _file_sha256(root / name) != sha:
                raise Damaged(f"checksum mismatch of {name}")
        except OSError as e:
            raise Damaged(f"{name} unreadable: {e.strerror or e}") from None


def folder(cache_dir: str | os.PathLike, namespace: str, name: str, build: Callable[[Path], None]) -> Path:
    """``<cache_dir>/<namespace>/<name>/``, verified against its manifest; built by ``build(tmp)`` into
    a temp folder, sealed and renamed into place when it is missing or damaged (which is reported),
    under a file lock: concurrent processes build it once."""
    target = Path(cache_dir) / namespace / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            try:
                _verify_folder(target)
                return target
            except Damaged as e:
                _remove(target, str(e), "cache folder")
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            atomic.write_bytes(tmp / MANIFEST, _sealed_json({str(p.relative_to(tmp)): _file_sha256(p)
                                                             for p in _files(tmp)}))
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
