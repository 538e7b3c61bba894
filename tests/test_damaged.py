"""Damaged files are never used: cache entries verified on read, damaged rows reported and treated
as missing, and a dry run that writes nothing (issue #30).

A damage is what a crash, a full disk or a bad block leaves: a file cut in half, a 4 KB block of
zeros inside it, unparseable metadata, or an entry written before entries carried checksums. Each
is reported in one warning line naming the file, and the entry is computed again (the row rewritten
by the rerun)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from lrsweep import atomic, cache, status
from lrsweep import row as rows_
from lrsweep.row import ResultRow, read_rows, row_path, row_status, write_row

# every namespace the package keeps safetensors entries in (lrsweep.cache.get_or_compute / shared_parts)
KINDS = ["calib", "embeddings", "probe", "perplexity", "sensitivity", "output_fisher", "zeroshot", "lm_eval"]


def zero_block(path: Path, at: int | None = None) -> None:
    """Overwrite 4 KB (or up to the end) with zeros, at ``at`` or in the middle, 4 KB aligned."""
    size = path.stat().st_size
    at = (size // 2) // 4096 * 4096 if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\0" * min(4096, size - at))


def cut_in_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def garble_metadata(path: Path) -> None:
    """Flip one byte inside the safetensors JSON header (after its 8-byte length): not JSON any more."""
    with open(path, "r+b") as f:
        f.seek(9)
        f.write(b"\x07")


DAMAGES = {"4 KB of zeros": zero_block, "cut in half": cut_in_half, "unparseable metadata": garble_metadata}


def warnings_about(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch):
    monkeypatch.setattr(atomic, "_reported", set(), raising=False)  # each test sees its own first warning


def _tensors(n: int = 6000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {"a": torch.randn(n, generator=g), "labels": torch.arange(n // 10)}  # > 4 KB past the header


# ---------------------------------------------------------------- safetensors entries
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_entry_is_reported_removed_and_computed_again(tmp_path, caplog, kind, damage):
    key = {"model": "m", "what": kind}
    calls = []

    def compute():
        calls.append(1)
        return _tensors(), {"accuracy_dense": 0.64}

    clean, info, hit = cache.get_or_compute(tmp_path, kind, key, compute)
    assert not hit and len(calls) == 1
    path = cache._path(tmp_path, kind, key)
    assert cache.get_or_compute(tmp_path, kind, key, compute)[2] and len(calls) == 1  # verified: read back
    DAMAGES[damage](path)
    assert cache.read(tmp_path, kind, key) is None  # never returned, even by the unlocked reader
    caplog.set_level(logging.WARNING)
    tensors, info, hit = cache.get_or_compute(tmp_path, kind, key, compute)
    assert not hit and len(calls) == 2 and info == {"accuracy_dense": 0.64}
    assert all(torch.equal(tensors[k], clean[k]) for k in clean)
    (line,) = warnings_about(caplog, path)
    assert line.startswith(f"[lrsweep] damaged cache entry {path} (") and line.endswith("removed; computing it again")
    assert "\n" not in line and ("cut short" in line if damage == "cut in half" else True)
    assert cache.get_or_compute(tmp_path, kind, key, compute)[2] and len(calls) == 2  # the new entry is good


def test_every_byte_of_an_entry_is_covered(tmp_path):
    """A one-byte change anywhere (header, metadata, the checksum itself, tensor data) is caught."""
    key = {"k": 1}
    cache.get_or_compute(tmp_path, "probe", key, lambda: (_tensors(300), {"x": 1}))
    path = cache._path(tmp_path, "probe", key)
    good = path.read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    sealed_at = good.index(b'"lrsweep_sha256":"') + len(b'"lrsweep_sha256":"')
    for at in (0, 20, sealed_at, sealed_at + 63, header_end - 2, header_end, len(good) // 2, len(good) - 1):
        bad = bytearray(good)
        bad[at] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(cache.Damaged):
            cache._read(path, key)
    path.write_bytes(good)
    assert cache._read(path, key)[1] == {"x": 1}


def test_an_entry_without_a_checksum_is_computed_again(tmp_path, caplog):
    """An entry written before entries carried checksums cannot be verified: it is not used."""
    from safetensors.torch import save_file

    key = {"old": True}
    path = cache._path(tmp_path, "calib", key)
    path.parent.mkdir(parents=True)
    save_file({"a": torch.zeros(3)}, str(path), metadata={"lrsweep": json.dumps({"key": key, "info": {"n": 0}})})
    caplog.set_level(logging.WARNING)
    tensors, info, hit = cache.get_or_compute(tmp_path, "calib", key, lambda: ({"a": torch.ones(3)}, {"n": 1}))
    assert not hit and info == {"n": 1} and torch.equal(tensors["a"], torch.ones(3))
    (line,) = warnings_about(caplog, path)
    assert "no checksum" in line


def test_shared_parts_recompute_only_the_damaged_part(tmp_path, caplog):
    key = {"texts": "t"}
    done = []

    def part(i):
        done.append(i)
        return {"e": torch.full((2000,), i)}

    first = cache.shared_parts(tmp_path, "embeddings", key, 3, part)
    cut_in_half(cache._path(tmp_path, "embeddings", {**key, "part": 1, "parts": 3}))
    caplog.set_level(logging.WARNING)
    again = cache.shared_parts(tmp_path, "embeddings", key, 3, part)
    assert done == [0, 1, 2, 1] and all(torch.equal(a["e"], b["e"]) for a, b in zip(first, again, strict=True))
    assert len([r for r in caplog.records if "damaged cache entry" in r.getMessage()]) == 1


# ---------------------------------------------------------------- JSON values (targets, lm-eval's task index)
@pytest.mark.parametrize("damage", ["4 KB of zeros", "cut in half", "not sealed"])
def test_a_damaged_json_value_is_reported_and_computed_again(tmp_path, caplog, damage):
    key = {"model": "m"}
    value = {f"encoder.layer.{i}.query": {"shape": [384, 384], "embedding": False, "tied": []} for i in range(80)}
    calls = []
    assert cache.json_value(tmp_path, "targets", key, lambda: (calls.append(1), value)[1]) == value
    path = tmp_path / "targets" / f"{cache.digest(key)}.json"
    assert cache.json_value(tmp_path, "targets", key, lambda: pytest.fail("computed again")) == value
    if damage == "not sealed":
        path.write_text(json.dumps({"encoder.layer.0.query": {"shape": [1, 1]}}))  # no checksum: not used
    else:
        (zero_block if damage == "4 KB of zeros" else cut_in_half)(path)
    caplog.set_level(logging.WARNING)
    assert cache.json_value(tmp_path, "targets", key, lambda: (calls.append(1), value)[1]) == value
    assert len(calls) == 2 and len(warnings_about(caplog, path)) == 1
    assert cache.json_value(tmp_path, "targets", key, lambda: pytest.fail("computed again")) == value


# ---------------------------------------------------------------- folders (the dequantized model, lm-eval tasks)
def _build(calls: list):
    def build(tmp: Path) -> None:
        calls.append(1)
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (tmp / "config.json").write_text('{"hidden_size": 8}')
    return build


@pytest.mark.parametrize("damage", ["4 KB of zeros", "cut in half", "file missing", "manifest missing",
                                    "manifest damaged"])
def test_a_damaged_folder_is_reported_removed_and_built_again(tmp_path, caplog, damage):
    calls = []
    folder = cache.folder(tmp_path, "models", "m-abc", _build(calls))
    clean = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert cache.folder(tmp_path, "models", "m-abc", _build(calls)) == folder and len(calls) == 1
    weights = folder / "model.safetensors"
    {"4 KB of zeros": lambda: zero_block(weights, 4096), "cut in half": lambda: cut_in_half(weights),
     "file missing": weights.unlink, "manifest missing": (folder / cache.MANIFEST).unlink,
     "manifest damaged": lambda: cut_in_half(folder / cache.MANIFEST)}[damage]()
    caplog.set_level(logging.WARNING)
    assert cache.folder(tmp_path, "models", "m-abc", _build(calls)) == folder and len(calls) == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == clean
    (line,) = warnings_about(caplog, folder)
    assert line.startswith(f"[lrsweep] damaged cache folder {folder} (")
    assert not list((tmp_path / "models").glob(".*.tmp"))


def test_a_failed_build_leaves_no_folder(tmp_path):
    def build(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        cache.folder(tmp_path, "models", "m", build)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m.lock"]


def test_the_gguf_model_folder_is_a_verified_cache_folder(tmp_path, monkeypatch, caplog):
    """models._gguf_as_folder keeps the dequantized model in cache.folder: a damaged file is rebuilt."""
    from omegaconf import OmegaConf

    from lrsweep import models

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny.gguf").write_bytes(b"GGUF" * 100)
    built = []

    class Fake:
        @staticmethod
        def from_pretrained(path, **kw):
            built.append(kw["gguf_file"])

            def save_pretrained(self, d, **k):
                Path(d).mkdir(parents=True, exist_ok=True)
                (Path(d) / "model.safetensors").write_bytes(b"w" * 9000)

            return type("M", (), {"save_pretrained": save_pretrained})()

    monkeypatch.setattr(models, "_auto_class", lambda kind: Fake)
    tokenizer = type("T", (), {"save_pretrained": lambda self, d: (Path(d) / "tokenizer.json").write_text("{}")})
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda path, **kw: tokenizer())
    mcfg = OmegaConf.create({"gguf_file": "tiny.gguf", "kind": "causal_lm", "trust_remote_code": False,
                             "revision": None})
    folder = Path(models._gguf_as_folder(mcfg, str(tmp_path / "src"), tmp_path / "cache"))
    assert models._gguf_as_folder(mcfg, str(tmp_path / "src"), tmp_path / "cache") == str(folder) and len(built) == 1
    zero_block(folder / "model.safetensors", 4096)
    caplog.set_level(logging.WARNING)
    models._gguf_as_folder(mcfg, str(tmp_path / "src"), tmp_path / "cache")
    assert len(built) == 2 and (folder / "model.safetensors").read_bytes() == b"w" * 9000
    assert len(warnings_about(caplog, folder)) == 1

def test_a_damaged_lm_eval_task_folder_is_rendered_again(compose, tmp_path, caplog):
    """The offline lm-eval task (yaml + test.jsonl under the cache) is a verified cache folder."""
    from lrsweep import evaluate
    from lrsweep.evaluate import lm_eval
    from test_lm_eval import LM_EVAL

    ctx = evaluate.Context(compose([*LM_EVAL, "model=smollm2"]), None, "cpu", str(tmp_path), {})
    folder = lm_eval.render_local_task(ctx)
    docs = (folder / "test.jsonl").read_bytes()
    zero_block(folder / "test.jsonl", 0)
    caplog.set_level(logging.WARNING)
    assert lm_eval.render_local_task(ctx) == folder and (folder / "test.jsonl").read_bytes() == docs
    assert len(warnings_about(caplog, folder)) == 1


# ---------------------------------------------------------------- rows
def _row(results_dir: Path, rid: str = "abc123", status: str = "ok") -> Path:
    return write_row(results_dir, ResultRow(run_id=rid, status=status, model="minilm", method="svd", rank=8,
                                            accuracy=0.64, finished_at="2026-01-01T00:00:00+00:00"))


ROW_DAMAGES = {"cut in half": cut_in_half, "not JSON": lambda p: p.write_text("<html>"),
               "not a row": lambda p: p.write_text('["run_id"]'), "unknown status": lambda p: p.write_text(
                   p.read_text().replace('"status": "ok"', '"status": "maybe"'))}


@pytest.mark.parametrize("damage", list(ROW_DAMAGES))
def test_a_damaged_row_is_one_warning_naming_it_and_counts_as_missing(tmp_path, caplog, damage):
    good = _row(tmp_path, "good1")
    bad = _row(tmp_path, "bad1")
    ROW_DAMAGES[damage](bad)
    caplog.set_level(logging.WARNING)
    assert rows_.load_row(bad) is None and row_status(tmp_path, "bad1") is None
    assert row_status(tmp_path, "good1") == "ok"
    assert [r.run_id for r in read_rows(tmp_path)] == ["good1"] and rows_.load_row(good).run_id == "good1"
    (line,) = warnings_about(caplog, bad)  # once per process, however many readers meet it
    assert line.startswith(f"[lrsweep] damaged row {bad} (") and line.endswith("a rerun of its point rewrites it")


def test_a_row_under_a_file_is_missing_not_damaged(tmp_path, caplog):
    """``rows`` a file (refused before launch): there is no row under it to call damaged."""
    (tmp_path / "rows").write_text("not a directory")
    caplog.set_level(logging.WARNING)
    assert rows_.load_row(row_path(tmp_path, "abc")) is None and row_status(tmp_path, "abc") is None
    assert list(read_rows(tmp_path)) == [] and caplog.records == []


def test_status_reports_a_damaged_row_and_a_damaged_manifest(tmp_path, capsys, caplog):
    _row(tmp_path, "good1")
    cut_in_half(_row(tmp_path, "bad1"))
    status.write_manifest(tmp_path, "s", "7", str(tmp_path), [{"index": 0, "run_id": "bad1", "job_id": "7_0",
                                                               "overrides": ["rank=8"]}])
    (tmp_path / "sweeps" / "s-8.json").write_text('{"sweep": "s", "points": [')
    caplog.set_level(logging.WARNING)
    assert status.main([str(tmp_path), "--no-slurm"]) == 1
    out = capsys.readouterr().out
    assert "missing  bad1 job 7_0" in out and "ok 1, failed 0, missing 1" in out
    cut_in_half(_row(tmp_path, "bad2"))  # not in a manifest (a local sweep): its file names the point
    assert status.main([str(tmp_path), "--no-slurm"]) == 1
    assert f"missing  bad2 job - damaged row {tmp_path / 'rows' / 'bad2.json'}: a rerun rewrites it" in (
        capsys.readouterr().out)
    assert len(warnings_about(caplog, tmp_path / "rows" / "bad1.json")) == 1
    assert len(warnings_about(caplog, tmp_path / "sweeps" / "s-8.json")) == 1


def test_analysis_loads_around_a_damaged_row(tmp_path, capsys, caplog):
    from analysis.__main__ import main as analysis_main
    from analysis.load import load

    _row(tmp_path, "good1")
    cut_in_half(_row(tmp_path, "bad1"))
    (tmp_path / "rows" / "empty.json").write_text("")
    caplog.set_level(logging.WARNING)
    assert list(load(tmp_path).run_id) == ["good1"]
    analysis_main(["table", str(tmp_path), "--kind", "summary"])
    assert "svd" in capsys.readouterr().out
    assert len(warnings_about(caplog, tmp_path / "rows" / "bad1.json")) == 1
    assert len(warnings_about(caplog, tmp_path / "rows" / "empty.json")) == 1


def test_the_skip_check_and_the_dry_run_report_a_damaged_row_and_the_rerun_rewrites_it(
        launch, tmp_path, capsys, caplog, monkeypatch):
    launch({"rank": [4, 8]})
    rows = {r.rank: r for r in read_rows(tmp_path)}
    bad = row_path(tmp_path, rows[8].run_id)
    cut_in_half(bad)
    capsys.readouterr()
    caplog.set_level(logging.WARNING)
    launch({"rank": [4, 8]}, "dry_run=true")
    out = capsys.readouterr().out
    assert "1 ok, 1 missing" in out and len(warnings_about(caplog, bad)) == 1
    caplog.clear()
    monkeypatch.setattr(atomic, "_reported", set(), raising=False)  # the sweep warns again
    launcher, _ = launch({"rank": [4, 8]})
    assert len(launcher._fake.jobs) == 1 and launcher._fake.jobs[0].points[0].cfg.rank == 8
    assert len(warnings_about(caplog, bad)) == 1  # the skip check said why the point runs again
    assert rows_.load_row(bad).status == "ok"  # rewritten


# ---------------------------------------------------------------- a dry run writes nothing
@pytest.mark.parametrize("multirun", [True, False])
def test_a_dry_run_leaves_a_new_results_dir_absent(cli, tmp_path, multirun):
    from conftest import FAST

    args = ["-m", "rank=4,8"] if multirun else ["rank=4"]
    code, out, _ = cli(*args, "dry_run=true", *FAST, r"model.targets=encoder\.layer\.0\.attention\.self\.query")
    assert code == 0 and "nothing was launched" in out
    assert not (tmp_path / "results").exists()  # cli's results_dir


def test_the_dry_run_still_refuses_an_unwritable_results_dir(tmp_path):
    from lrsweep.errors import ConfigError
    from lrsweep.validate import check_results_dir

    (tmp_path / "file").write_text("x")
    for dry in (True, False):
        with pytest.raises(ConfigError, match=r"results_dir: '.*/file/results' is under '.*/file', which is a file"):
            check_results_dir(str(tmp_path / "file" / "results"), dry)
        with pytest.raises(ConfigError, match=r"results_dir: '.*/file' is a file, not a directory"):
            check_results_dir(str(tmp_path / "file"), dry)
    check_results_dir(str(tmp_path / "a" / "b"), dry_run=True)
    assert not (tmp_path / "a").exists()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            check_results_dir(str(ro / "results"), dry_run=True)

