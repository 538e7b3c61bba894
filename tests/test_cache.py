"""cache.shared_parts: the parts of one computation split between the processes that need it at once."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import time
from pathlib import Path

import torch

from lrsweep import cache

KEY = {"what": "squares", "n": 6}


def _square(i: int, log: Path | None = None, pause: float = 0.0) -> dict[str, torch.Tensor]:
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {i}\n")
    time.sleep(pause)
    return {"x": torch.full((3,), float(i * i))}


def _values(parts: list[dict[str, torch.Tensor]]) -> list[float]:
    return [float(p["x"][0]) for p in parts]


def test_alone_a_process_computes_every_part_once_and_reads_them_after(tmp_path):
    done = []
    parts = cache.shared_parts(tmp_path, "sq", KEY, 6, lambda i: (done.append(i), _square(i))[1])
    assert _values(parts) == [0, 1, 4, 9, 16, 25] and done == [0, 1, 2, 3, 4, 5]
    again = cache.shared_parts(tmp_path, "sq", KEY, 6, lambda i: (done.append(i), _square(i))[1])
    assert _values(again) == _values(parts) and done == [0, 1, 2, 3, 4, 5]  # all read
    assert cache.shared_parts(tmp_path, "sq", {**KEY, "n": 7}, 2, _square) is not None  # another key: computed
    assert len(list((tmp_path / "sq").glob("*.safetensors"))) == 8


def _worker(cache_dir: str, log: str, out: str) -> None:
    parts = cache.shared_parts(cache_dir, "sq", KEY, 6, lambda i: _square(i, Path(log), pause=0.3))
    Path(out).write_text(" ".join(str(v) for v in _values(parts)))


def test_two_processes_split_the_parts_and_both_get_all_of_them(tmp_path):
    log, ctx = tmp_path / "computed.txt", multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "c"), str(log), str(tmp_path / f"out{k}")))
             for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [(tmp_path / f"out{k}").read_text() for k in range(2)] == ["0.0 1.0 4.0 9.0 16.0 25.0"] * 2
    computed = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(i) for _, i in computed) == [0, 1, 2, 3, 4, 5]  # each part once
    by = {pid for pid, _ in computed}
    assert len(by) == 2, computed  # both processes computed some: neither waited for the other's parts


def test_a_part_whose_holder_ends_without_writing_it_is_computed_by_the_reader(tmp_path):
    """A held part is skipped, then waited for at the end; when its holder lets go without an
    entry (a process that died), the waiting process computes it."""
    path = Path(str(cache._path(tmp_path, "sq", {**KEY, "part": 1, "parts": 3})) + ".lock")
    path.parent.mkdir(parents=True)
    order = []
    with open(path, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: another holder, as a sibling job's lock

        def compute(i: int) -> dict[str, torch.Tensor]:
            order.append(i)
            if i == 2:  # the holder dies while this process computes part 2
                fcntl.flock(holder, fcntl.LOCK_UN)
            return _square(i)

        parts = cache.shared_parts(tmp_path, "sq", KEY, 3, compute)
    assert order == [0, 2, 1] and _values(parts) == [0, 1, 4]
