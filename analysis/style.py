"""One look and one vocabulary for every figure and table: sizes, fonts, each method's colour and
marker, axis labels, which direction of a metric is better, and the mean ± its uncertainty.

Every figure is written as PNG and PDF (same stem), in one style sized for a paper column
(3.4 in per panel, 8 pt text); a method keeps its colour and marker in every figure.
Values are means over seeds, error bars ± one standard deviation over the seeds (ddof=1); a
configuration with one seed gets ± the evaluation's own standard error (``<metric>_stderr`` of the
row: binomial for accuracies, delta method over windows for perplexity; lrsweep.stderr), and so do
seeds that agree exactly (a deterministic method run with several seeds); no bar when
the row has no such column (reconstruction error, latency).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import pandas as pd

logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter under Hydra's INFO root

COLUMN_WIDTH = 3.4  # inches: one column of a two-column paper
TEXT_WIDTH = 7.0
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "lines.linewidth": 1.2, "lines.markersize": 3.5, "axes.grid": True,
         "grid.alpha": 0.3, "grid.linewidth": 0.5, "axes.spines.top": False, "axes.spines.right": False,
         "savefig.dpi": 200, "pdf.fonttype": 42, "legend.frameon": False}
# known methods keep one colour everywhere; others take the next free colour in name order
KNOWN = ["quant", "svd", "lsvd", "dsvd", "lplr", "rsvd", "fwsvd", "asvd", "drone", "svdllm", "losparse", "kron"]
MARKERS = "osD^v<>px*hH"
HIGHER_BETTER = {"accuracy", "accuracy_dense", "accuracy_refit", "ndcg_at_10", "ndcg_at_10_dense", "speedup",
                 "compression_ratio", "cosine_similarity"}
LOWER_BETTER = {"perplexity", "perplexity_dense", "recon_rel_err", "latency_ms", "bits_per_weight", "rank",
                "bits", "bits_compressed", "params_compressed", "compress_seconds", "wall_seconds"}
LABELS = {"bits_per_weight": "bits per weight", "compression_ratio": "compression ratio (×)",
          "recon_rel_err": r"relative error $\|W-\hat W\|_F/\|W\|_F$", "latency_ms": "latency (ms)",
          "speedup": "speedup over dense (×)", "cosine_similarity": "cosine similarity to dense",
          "accuracy_refit": "accuracy (probe refitted)", "ndcg_at_10": "nDCG@10 (retrieval)"}
METRICS = ("accuracy", "accuracy_refit", "ndcg_at_10", "perplexity", "recon_rel_err", "speedup", "latency_ms",
           "cosine_similarity")
# the dense model's value of a metric, where it is not <metric>_dense (a probe refitted on the dense
# model's embeddings is the dense probe)
DENSE_OF = {"accuracy_refit": "accuracy_dense"}
GROUP_KEYS = ("model", "method", "rank", "bits", "budget", "param_ratio", "allocation",
              "heal")  # one configuration; seeds are repeats


def label(col: str, tex: bool = True) -> str:
    return LABELS.get(col, col.replace("_", " ")) if tex or "$" not in LABELS.get(col, "") else col.replace("_", " ")


def better(col: str) -> str:
    """'max' or 'min': which direction of ``col`` is better."""
    if col.startswith("task.") and (d := _task_direction(col)):
        return d
    if col in HIGHER_BETTER:
        return "max"
    if col in LOWER_BETTER:
        return "min"
    raise ValueError(f"do not know whether larger {col!r} is better; known: "
                     f"{', '.join(sorted(HIGHER_BETTER | LOWER_BETTER))}")


def _task_direction(col: str) -> str | None:
    """Per-task lm-eval metrics (``task.<task>.<metric>[_dense]``): perplexities and bits/byte lower,
    other metrics (acc, acc_norm, f1, exact_match, ...) higher; stderrs and counts have none."""
    metric = col.rsplit(".", 1)[1].removesuffix("_dense")
    if "stderr" in metric or metric == "n":
        return None
    return "min" if "perplexity" in metric or "bits_per_byte" in metric else "max"


def direction(col: str) -> str | None:
    """'max', 'min', or None for a column with no better direction."""
    try:
        return better(col)
    except ValueError:
        return None


def default_metric(df: pd.DataFrame) -> str:
    for col in ("accuracy", "perplexity", "recon_rel_err"):
        if col in df and df[col].notna().any():
            return col
    raise ValueError("no metric column has values")


def available_metrics(df: pd.DataFrame) -> list[str]:
    return [c for c in METRICS if c in df and df[c].notna().any()]


def styles(values: Sequence) -> dict:
    """value → (colour, marker), stable: known methods first in KNOWN order, others sorted."""
    values = sorted(set(values), key=lambda v: (KNOWN.index(v) if v in KNOWN else len(KNOWN), str(v)))
    fixed = {m: i for i, m in enumerate(KNOWN)}
    out, free = {}, len(KNOWN)
    for v in values:
        i = fixed.get(v)
        if i is None:
            i, free = free, free + 1
        out[v] = (plt.get_cmap("tab20")(i % 20) if i >= 10 else plt.get_cmap("tab10")(i), MARKERS[i % len(MARKERS)])
    return out


def use_log(values: pd.Series) -> bool:
    """Log scale when every value is positive and they span at least a factor of 10."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(v) and (v > 0).all() and v.max() / v.min() >= 10)


def dense_column(y: str) -> str:
    """The column holding the dense model's value of metric ``y``."""
    return DENSE_OF.get(y, f"{y}_dense")


def stderr_column(y: str) -> str:
    """The row's column of the evaluation's standard error of ``y`` (lrsweep.stderr)."""
    return f"{y}_stderr"


def aggregate(df: pd.DataFrame, keys: Sequence[str], y: str) -> pd.DataFrame:
    """Per ``keys``: mean, std (ddof=1, 0 for a single seed) and count of ``y``; ``se``: the mean of the
    evaluation's standard error (NaN without it); ``err``: the error bar, std over seeds, for a single
    seed (or seeds that agree exactly: a deterministic method) ``se`` (0 without it); ``sem``: the
    standard error of the mean, sqrt(std² / count + se²) (the seeds' spread and the test set's
    sampling noise, independent; the terms missing are 0)."""
    keys = list(dict.fromkeys(keys))
    d = df.dropna(subset=[y]).copy()
    for k in keys:  # a key column that is all NaN (e.g. budget) must not drop every row
        d[k] = d[k].astype(object).where(d[k].notna(), "—")
    se_col = stderr_column(y)
    d["_se"] = pd.to_numeric(d[se_col], errors="coerce") if se_col in d else float("nan")
    g = d.groupby(keys, sort=True, dropna=False).agg(mean=(y, "mean"), std=(y, "std"), count=(y, "count"),
                                                      se=("_se", "mean")).reset_index()
    g["std"] = g["std"].fillna(0.0)
    g["err"] = g["std"].where((g["count"] > 1) & (g["std"] > 0), g["se"]).fillna(0.0)
    g["sem"] = (g["std"] ** 2 / g["count"] + g["se"].fillna(0.0) ** 2) ** 0.5
    return g


def savefig(fig, out: str | Path) -> Path:
    """Write ``out`` as .png and .pdf; returns the PNG path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    fig.savefig(png)
    fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)
    return png


def set_log(ax, which: str = "y", base: int = 10) -> None:
    """Log scale with plain tick labels (0.5, 2, 100), no labelled minor ticks."""
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(mticker.LogLocator(base, subs=(1.0, 2.0, 5.0) if base == 10 else (1.0,), numticks=6))
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mticker.NullFormatter())
