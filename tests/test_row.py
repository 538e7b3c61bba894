"""The result row schema: strict JSON, atomic writes, round trips."""

from __future__ import annotations

import json
import math

import pytest

from lrsweep.row import ResultRow, read_row, read_rows, row_path, row_status, write_row


def test_round_trip(tmp_path):
    row = ResultRow(run_id="abc123", status="ok", model="m", method="svd", rank=4, bits=8,
                    accuracy=0.5, layer_errors={"a": 0.1}, config={"x": {"y": 1}})
    path = write_row(tmp_path, row)
    assert path == tmp_path / "rows" / "abc123.json"
    assert read_row(path) == row
    assert row_status(tmp_path, "abc123") == "ok" and row_status(tmp_path, "other") is None


def test_nan_becomes_null_and_unknown_types_raise(tmp_path):
    row = ResultRow(run_id="r1", accuracy=math.nan)
    write_row(tmp_path, row)
    assert json.loads((tmp_path / "rows" / "r1.json").read_text())["accuracy"] is None
    with pytest.raises(TypeError):
        write_row(tmp_path, ResultRow(run_id="r2", extra={"x": object()}))
    assert not (tmp_path / "rows" / "r2.json").exists()
    assert [p.name for p in (tmp_path / "rows").iterdir()] == ["r1.json"]  # no temp file left


def test_reader_ignores_temp_files_and_rejects_unknown_keys(tmp_path):
    write_row(tmp_path, ResultRow(run_id="r1"))
    (tmp_path / "rows" / ".r2.x.tmp").write_text("{partial")
    assert [r.run_id for r in read_rows(tmp_path)] == ["r1"]
    with pytest.raises(ValueError):
        ResultRow.from_dict({"run_id": "x", "bogus": 1})


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".."])
def test_run_ids_cannot_escape_results_dir(tmp_path, bad):
    with pytest.raises(ValueError):
        row_path(tmp_path, bad)


def test_summary_is_flat_scalars():
    s = ResultRow(run_id="r", accuracy=0.7, layer_errors={"a": 1.0}, config={"k": 1}).summary()
    assert s["accuracy"] == 0.7 and "layer_errors" not in s and "config" not in s and "error" not in s


def test_fail_records_the_exception_or_the_given_message_and_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        row = ResultRow(run_id="r1", status="ok").fail(e)
    assert row.status == "failed" and row.finished_at
    assert row.error["type"] == "RuntimeError" and row.error["message"] == "boom"
    assert "Traceback" in row.error["traceback"] and 'raise RuntimeError("boom")' in row.error["traceback"]
    given = ResultRow(run_id="r2").fail(KeyError("k"), "job 7 ended without a row", "stderr tail")
    assert given.error == {"type": "KeyError", "message": "job 7 ended without a row", "traceback": "stderr tail"}


def test_atomic_write_leaves_the_old_file_and_no_temp_file_when_the_writer_raises(tmp_path):
    from lrsweep import atomic

    target = tmp_path / "d" / "f.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(OSError, match="disk full"), atomic.replacing(target) as tmp:
        tmp.write_text('{"v": 2, "part')
        raise OSError("disk full")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_atomic_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    import os
    import stat

    from lrsweep import atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    atomic.write_text(tmp_path / "x.txt", "x")
    assert synced == [False, True]  # the temp file before the rename, the directory after


@pytest.mark.parametrize("env, job_id, index", [
    ({}, None, None),
    ({"SLURM_JOB_ID": "77"}, "77", None),
    ({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "4"}, "70_4", "4"),
])
def test_slurm_job_id_names_array_tasks_as_squeue_does(env, job_id, index):
    from lrsweep import slurm

    assert slurm.job_id(env) == job_id and slurm.array_index(env) == index
