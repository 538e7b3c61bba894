"""Load result rows into one pandas DataFrame (columns from the shared row schema)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import pandas as pd

from lrsweep.row import ResultRow, read_rows

TABLE_COLUMNS = ["model", "method", "rank", "bits", "bits_per_weight", "compression_ratio", "recon_rel_err",
                 "accuracy_dense", "accuracy", "perplexity_dense", "perplexity", "latency_ms_dense", "latency_ms"]


def frame(rows: Iterable[ResultRow]) -> pd.DataFrame:
    """One row per run; the nested config is flattened into ``config.<dotted.key>`` columns."""
    records = []
    for row in rows:
        d = row.to_dict()
        config = d.pop("config")
        d.update({f"config.{k}": v for k, v in pd.json_normalize(config, sep=".").iloc[0].items()} if config else {})
        records.append(d)
    df = pd.DataFrame.from_records(records, columns=None if records else ResultRow.columns())
    for col in ResultRow.columns():
        if col not in df:
            df[col] = None
    return df


def load(*results_dirs: str | os.PathLike) -> pd.DataFrame:
    """All rows of one or more results dirs; one row per run_id (the newest ok one wins)."""
    rows = [r for d in results_dirs for r in read_rows(d)]
    df = frame(rows)
    if df.empty:
        return df
    df["_ok"] = df["status"] == "ok"
    df = df.sort_values(["_ok", "finished_at"]).drop_duplicates("run_id", keep="last").drop(columns="_ok")
    return df.reset_index(drop=True)
