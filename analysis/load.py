"""Load result rows into one pandas DataFrame (columns from the shared row schema).

Sources are results dirs (``<dir>/rows/*.json``; without rows, the offline W&B runs in
``<dir>/wandb/``) or W&B projects written as ``wandb:<entity>/<project>``. One row per run_id: the
newest ok row wins, else the newest failed one. Failed runs are kept (``ok`` is False,
``error_line`` says why). The nested config is flattened into ``config.<dotted.key>`` columns.
Dtypes follow the row's type hints: optional ints are ``Int64``, floats ``float64``, optional bools
``boolean``, times UTC.
"""

from __future__ import annotations

import os
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from lrsweep.row import ResultRow, read_rows

TABLE_COLUMNS = ["model", "method", "rank", "bits", "budget", "param_ratio", "allocation", "seed", "heal",
                 "bits_per_weight", "compression_ratio", "recon_rel_err", "accuracy_dense", "accuracy_pre_heal",
                 "accuracy", "accuracy_refit", "ndcg_at_10_dense", "ndcg_at_10", "perplexity_dense",
                 "perplexity_pre_heal", "perplexity", "latency_ms_dense", "latency_ms"]
# columns added here, next to the schema's
DERIVED = ["ok", "error_line", "speedup", "source"]
WANDB_PREFIX = "wandb:"


def _dtype(hint: Any) -> str | None:
    args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    optional, args = type(None) in args, args - {type(None)}
    if len(args) != 1:
        return None
    (t,) = args
    if t is bool:
        return "boolean"
    if t is int:
        return "Int64" if optional else "int64"
    if t is float:
        return "float64"
    if t is str:
        return "str"
    return None  # dicts stay python objects


SCHEMA_DTYPES = {k: d for k, h in typing.get_type_hints(ResultRow).items() if (d := _dtype(h))}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def error_line(error: dict[str, str] | None) -> str | None:
    if not error:
        return None
    lines = [ln for ln in str(error.get("message", "")).splitlines() if ln.strip()]
    return f"{error.get('type', 'Error')}: {lines[0] if lines else ''}".rstrip(": ")


def task_columns(row: ResultRow) -> dict[str, float]:
    """Per-task metrics (eval=lm_eval) as float columns: ``task.<task>.<metric>`` and ``..._dense``."""
    out = {}
    for table, suffix in ((row.task_metrics, ""), (row.task_metrics_dense, "_dense")):
        for task, metrics in table.items():
            out.update({f"task.{task}.{m}{suffix}": float(v) for m, v in metrics.items()})
    return out


def _record(row: ResultRow, source: str) -> dict[str, Any]:
    d = row.to_dict()
    config = d["config"] or {}
    d.update({f"config.{k}": v for k, v in flatten(config).items()})
    d.update(task_columns(row))
    d["source"] = source
    return d


def frame(rows: Iterable[ResultRow], source: str = "") -> pd.DataFrame:
    """One line per row (no de-duplication), schema columns first, typed."""
    records = [_record(r, source) for r in rows]
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    for col in ResultRow.columns() + ["source"]:
        if col not in df:
            df[col] = pd.Series([None] * len(df), dtype=object)
    for col, dtype in SCHEMA_DTYPES.items():
        df[col] = df[col].astype(dtype)
    for col in ("started_at", "finished_at"):
        df[col] = pd.to_datetime(df[col].replace("", None), utc=True, format="ISO8601")
    df["ok"] = df["status"] == "ok"
    df["error_line"] = df["error"].map(error_line).astype("str")
    df["speedup"] = df["latency_ms_dense"] / df["latency_ms"]
    first = ResultRow.columns() + [c for c in DERIVED if c != "source"] + ["source"]
    return df[first + sorted(c for c in df.columns if c not in first)]


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One line per run_id: the newest ok row, else the newest failed row."""
    if df.empty:
        return df.reset_index(drop=True)
    order = df.sort_values(["ok", "finished_at"], na_position="first", kind="stable")
    return order.drop_duplicates("run_id", keep="last").sort_index().reset_index(drop=True)


def row_from_wandb(summary: dict[str, Any], config: dict[str, Any]) -> ResultRow | None:
    """A row from a W&B run's summary (the row's scalars + layer_errors) and config; None when the
    run is not an lrsweep run. Fields W&B does not hold (error, extra, versions) stay empty."""
    fields = set(ResultRow.columns()) - {"config"}
    data = {k: v for k, v in summary.items() if k in fields}
    if "run_id" not in data:
        return None
    return ResultRow.from_dict({**data, "config": {k: v for k, v in config.items() if not k.startswith("_")}})


def offline_rows(results_dir: str | os.PathLike) -> list[ResultRow]:
    """Rows rebuilt from offline W&B runs under ``results_dir`` (``wandb/offline-run-*``)."""
    from lrsweep.logger import read_offline_run

    rows = []
    for run_dir in sorted(Path(results_dir).glob("wandb/offline-run-*")):
        if run_dir.is_dir() and any(run_dir.glob("run-*.wandb")):
            run = read_offline_run(run_dir)
            if (row := row_from_wandb(run["summary"], run["config"])) is not None:
                rows.append(row)
    return rows


def wandb_rows(project: str, api: Any = None) -> list[ResultRow]:
    """Rows rebuilt from the runs of a W&B project (summary = row scalars, config = config).

    Offline (``WANDB_MODE`` offline/disabled) or unreachable, it warns and returns no rows.
    """
    if api is None:
        if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
            print(f"[analysis] W&B is offline: skipped {project}", file=sys.stderr)
            return []
        try:
            import wandb

            api = wandb.Api(timeout=20)
        except Exception as e:  # no key, no network: skip this source, say so
            print(f"[analysis] W&B unavailable, skipped {project}: {type(e).__name__}: {e}", file=sys.stderr)
            return []
    rows = []
    try:
        for run in api.runs(project):
            row = row_from_wandb(dict(getattr(run.summary, "_json_dict", run.summary)), dict(run.config))
            if row is not None:
                rows.append(row)
    except Exception as e:
        print(f"[analysis] W&B unavailable, skipped {project}: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    return rows


def load(*sources: str | os.PathLike) -> pd.DataFrame:
    """All rows of results dirs and/or ``wandb:<entity>/<project>``; one line per run_id.

    Args:
        *sources: results dirs (their ``rows/``; a dir without rows is read from its offline W&B
            runs in ``wandb/``) or ``wandb:<entity>/<project>`` (skipped with a warning when W&B
            is offline or unreachable).

    Returns:
        One line per run_id (the newest ok row, else the newest failed one): the ``ResultRow``
        fields typed (``Int64``, ``float64``, ``boolean``, UTC times), the config flattened as
        ``config.<dotted.key>``, ``task.<task>.<metric>`` columns of ``eval=lm_eval`` rows, and
        ``ok``, ``error_line``, ``speedup`` (dense over compressed latency) and ``source``.

    Example:
        ```python
        df = load("results")
        df[df.ok].groupby(["method", "rank"])["accuracy"].mean()
        ```
    """
    frames = []
    for src in sources:
        src = str(src)
        if src.startswith(WANDB_PREFIX):
            frames.append(frame(wandb_rows(src[len(WANDB_PREFIX):]), src))
        elif (Path(src) / "rows").is_dir() or not any(Path(src).glob("wandb/offline-run-*")):
            frames.append(frame(read_rows(src), os.path.abspath(src)))
        else:  # no row files, but offline W&B runs: read those
            frames.append(frame(offline_rows(src), os.path.abspath(src)))
    frames = [f for f in frames if not f.empty] or [frame([])]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return dedupe(df)
