"""The result row: one typed schema shared by the runner, W&B logging and analysis.

One JSON object per run at ``<results_dir>/rows/<run_id>.json``, written atomically
(lrsweep.atomic) so a reader never sees a partial row. A failed grid point's row is made by
:meth:`ResultRow.fail`, wherever the failure is seen (the job, the CLI, the sweep).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import traceback as tb
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lrsweep import atomic

SCHEMA_VERSION = 2  # a new version changes every run_id: python -m lrsweep.rekey moves the rows
STATUSES = ("ok", "failed")


def now() -> str:
    """The UTC time of a row's started_at / finished_at."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class ResultRow:
    """One grid point's result: what ran, what it stores, how good and fast it is, where it ran.

    Written as ``<results_dir>/rows/<run_id>.json`` (:func:`write_row`), logged as the W&B run's
    summary (:meth:`summary`) and read back as one DataFrame line by ``analysis.load``. Fields
    come in groups: identity (run_id ... sweep), size, rank allocation, quality, healing, speed,
    provenance. Sizes count the stored tensors of the compressed layers, quantizer metadata
    included. A failed row has ``status == "failed"`` and ``error``; its measurements may be empty.
    """

    # identity
    run_id: str
    status: str = "failed"  # "ok" | "failed"
    model: str = ""
    method: str = ""
    rank: int | None = None
    bits: int | None = None
    budget: float | None = None
    param_ratio: float | None = None  # the configured fraction of each layer's parameters kept
    seed: int = 0
    device: str = ""
    task: str | None = None  # evaluation task name (e.g. rotten_tomatoes, news_ppl)
    run_name: str = ""
    sweep: str = ""  # the sweep (W&B group) this run was launched in
    # size
    params_dense: int | None = None
    params_compressed: int | None = None
    bits_dense: int | None = None
    bits_compressed: int | None = None
    bits_per_weight: float | None = None
    compression_ratio: float | None = None
    param_ratio_measured: float | None = None  # stored weight entries / dense ones, over the compressed layers
    # rank allocation (allocation=...): the strategy configured and the one that shipped (uniform when the
    # candidate's held-out calibration loss was not below uniform's: both losses recorded)
    allocation: str = "uniform"
    allocation_shipped: str | None = None
    allocation_loss_uniform: float | None = None
    allocation_loss: float | None = None
    bits_predicted: int | None = None  # stored bits the ranks should give (storage_bits); achieved: bits_compressed
    layers_compressed: int | None = None
    exceeds_break_even: bool | None = None
    # quality
    recon_rel_err: float | None = None  # parameter-weighted mean of per-layer ||W - W_hat||_F / ||W||_F
    layer_errors: dict[str, float] = field(default_factory=dict)
    accuracy_dense: float | None = None
    accuracy: float | None = None
    perplexity_dense: float | None = None
    perplexity: float | None = None
    cosine_similarity: float | None = None
    # encoders: accuracy of a probe refitted on the compressed model's own embeddings (the dense one: accuracy_dense)
    accuracy_refit: float | None = None
    # encoders with eval.retrieval.queries > 0: nDCG@10 of title -> article retrieval, each model ranking by
    # its own embeddings (lrsweep.evaluate.retrieval; MRR@10 in extra["retrieval"])
    ndcg_at_10_dense: float | None = None
    ndcg_at_10: float | None = None
    # standard errors of the metrics above from the evaluation itself (lrsweep.stderr): accuracies binomial
    # sqrt(p (1 - p) / n) over the test items, nDCG@10 the per-query std / sqrt(queries), perplexities by
    # the delta method over the windows' losses
    accuracy_dense_stderr: float | None = None
    accuracy_stderr: float | None = None
    accuracy_refit_stderr: float | None = None
    ndcg_at_10_dense_stderr: float | None = None
    ndcg_at_10_stderr: float | None = None
    perplexity_dense_stderr: float | None = None
    perplexity_stderr: float | None = None
    # per-task metrics of multi-task evaluators (eval=lm_eval): {task: {acc, acc_stderr, acc_norm, ..., n}}
    task_metrics_dense: dict[str, dict[str, float]] = field(default_factory=dict)
    task_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # healing (heal=distill | dsee): the fields above describe the healed model, these the model before
    heal: str = "none"  # the healer (conf/heal/), "none" without healing
    heal_seconds: float | None = None
    recon_rel_err_pre_heal: float | None = None
    bits_per_weight_pre_heal: float | None = None
    accuracy_pre_heal: float | None = None
    perplexity_pre_heal: float | None = None
    cosine_similarity_pre_heal: float | None = None
    # speed
    latency_ms_dense: float | None = None  # median forward time at eval.latency's primary shape
    latency_ms: float | None = None
    latency_ms_dense_p90: float | None = None
    latency_ms_p90: float | None = None
    peak_mem_mb: float | None = None  # peak of the job: CUDA max allocated on a GPU, max RSS on CPU
    model_bytes_dense: int | None = None  # parameters + buffers in memory
    model_bytes: int | None = None
    compress_seconds: float | None = None
    wall_seconds: float | None = None
    # provenance
    started_at: str = ""
    finished_at: str = ""
    git_sha: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    host: str = ""
    gpu_name: str | None = None
    slurm_job_id: str | None = None
    slurm_array_index: str | None = None
    log_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # method/eval details (solver, fallbacks, ...)
    config: dict[str, Any] = field(default_factory=dict)  # the full resolved config
    error: dict[str, str] | None = None  # {"type", "message", "traceback"} on failure
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResultRow:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"row has unknown keys {sorted(unknown)}")
        return cls(**data)

    def fail(self, error: BaseException, message: str | None = None, traceback: str | None = None) -> ResultRow:
        """Mark the row failed, finished now: ``error`` = {type, message, traceback}, the message and
        traceback being the exception's own unless given."""
        self.status = "failed"
        self.error = {"type": type(error).__name__, "message": str(error) if message is None else message,
                      "traceback": "".join(tb.format_exception(error)) if traceback is None else traceback}
        self.finished_at = now()
        return self

    def summary(self) -> dict[str, Any]:
        """The flat scalars of the row: what goes into the W&B run summary."""
        return {k: v for k, v in self.to_dict().items() if not isinstance(v, dict | list) and v is not None}


def _jsonable(obj: Any) -> Any:
    """Strict conversion to JSON types: NaN/inf become None, unknown types raise."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalar
        return _jsonable(obj.item())
    raise TypeError(f"cannot store {type(obj).__name__} in a result row")


def rows_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "rows"


def row_path(results_dir: str | os.PathLike, run_id: str) -> Path:
    if not run_id or not run_id.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"run_id {run_id!r} is not a plain name")
    return rows_dir(results_dir) / f"{run_id}.json"


def write_row(results_dir: str | os.PathLike, row: ResultRow) -> Path:
    """Write the row atomically (lrsweep.atomic): a reader sees the old row or the new one."""
    return atomic.write_json(row_path(results_dir, row.run_id), row.to_dict())


DAMAGED_ROW = "treated as missing; a rerun of its point rewrites it"


def _row(data: Any) -> ResultRow:
    if not isinstance(data, dict):
        raise TypeError(f"a row is a JSON object, not {type(data).__name__}")
    row = ResultRow.from_dict(data)
    if row.status not in STATUSES:
        raise ValueError(f"status {row.status!r} is not one of {list(STATUSES)}")
    return row


def read_row(path: str | os.PathLike) -> ResultRow:
    """The row at ``path``; raises OSError / ValueError / TypeError when it is missing or damaged
    (:func:`load_row` reports and skips those instead)."""
    return _row(json.loads(Path(path).read_text()))


def load_row(path: str | os.PathLike) -> ResultRow | None:
    """The row at ``path``; None when there is none, or when it is damaged (cut short, not JSON, not a
    row): that is reported in one warning line naming its path, and the row counts as missing. Every
    reader of rows (the sweep's skip check and dry run, status, analysis) reads them here."""
    return atomic.read_json(path, "row", _row, DAMAGED_ROW)


def scan_rows(results_dir: str | os.PathLike) -> tuple[list[ResultRow], list[Path]]:
    """(every complete row under ``results_dir``, the paths of the damaged ones: reported by
    :func:`load_row`); temp files of writers in flight are ignored."""
    d = rows_dir(results_dir)
    rows, damaged = [], []
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        row = load_row(path)
        if row is not None:
            rows.append(row)
        elif path.exists():  # not removed since the listing: damaged
            damaged.append(path)
    return rows, damaged


def read_rows(results_dir: str | os.PathLike) -> Iterator[ResultRow]:
    """Every complete row under ``results_dir`` (a damaged row is reported and skipped: :func:`scan_rows`)."""
    yield from scan_rows(results_dir)[0]


def row_status(results_dir: str | os.PathLike, run_id: str) -> str | None:
    """'ok' / 'failed' for an existing row, None when there is none (or it is damaged: :func:`load_row`)."""
    row = load_row(row_path(results_dir, run_id))
    return row.status if row is not None else None
