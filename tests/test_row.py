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
