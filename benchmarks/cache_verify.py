"""What verifying the cache's entries on read costs: per kind of entry, the checksum check against
the read itself.

    python benchmarks/cache_verify.py <cache_dir> [--repeats 5]

For every safetensors entry (``<cache_dir>/<kind>/*.safetensors``) it times, median of the repeats
and warm (the file in the page cache, as a job finds an entry another job just wrote or read):
the check (lrsweep.cache's sha256 of the file's bytes) and ``safetensors.torch.load_file`` with
every tensor touched; for folder entries (``models/``, ``lm_eval_tasks/``) the check against the
manifest and the read of their files; for JSON values the check and ``json.loads``. Prints one line
per kind: entries, MB, check ms, read ms, check / read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from safetensors.torch import load_file

from lrsweep import cache


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _load(path: Path) -> None:
    for t in load_file(str(path)).values():
        t.sum()  # touch every tensor: load_file maps the file lazily


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for kind_dir in sorted(p for p in args.cache_dir.iterdir() if p.is_dir() and p.name != "locks"):
        for entry in sorted(kind_dir.iterdir()):
            if entry.name.startswith(".") or entry.suffix == ".lock":
                continue
            if entry.suffix == ".safetensors":
                check = lambda e=entry: cache._verify_safetensors(e)  # noqa: E731
                read = lambda e=entry: _load(e)  # noqa: E731
                size = entry.stat().st_size
            elif entry.suffix == ".json":
                check = lambda e=entry: cache._open_sealed_json(e.read_bytes())  # noqa: E731
                read = lambda e=entry: json.loads(e.read_bytes())  # noqa: E731
                size = entry.stat().st_size
            elif entry.is_dir():
                files = cache._files(entry)
                check = lambda e=entry: cache._verify_folder(e)  # noqa: E731
                read = lambda fs=files: [_load(f) if f.suffix == ".safetensors" else f.read_bytes() for f in fs]  # noqa: E731
                size = sum(f.stat().st_size for f in files)
            else:
                continue
            read()  # warm
            k = kinds[kind_dir.name]
            k[0] += 1
            k[1] += size / 1e6
            k[2] += _median_ms(check, args.repeats)
            k[3] += _median_ms(read, args.repeats)
    print(f"{'kind':<16}{'entries':>8}{'MB':>10}{'check ms':>10}{'read ms':>10}{'check/read':>11}")
    total = [0, 0.0, 0.0, 0.0]
    for name, (n, mb, check_ms, read_ms) in kinds.items():
        print(f"{name:<16}{n:>8}{mb:>10.2f}{check_ms:>10.1f}{read_ms:>10.1f}{check_ms / read_ms:>11.2f}")
        total = [a + b for a, b in zip(total, (n, mb, check_ms, read_ms), strict=True)]
    n, mb, check_ms, read_ms = total
    print(f"{'all':<16}{n:>8}{mb:>10.2f}{check_ms:>10.1f}{read_ms:>10.1f}{check_ms / max(read_ms, 1e-9):>11.2f}")


if __name__ == "__main__":
    main()
