"""Figures with matplotlib: metric against bits per weight, one line per method."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def default_metric(df: pd.DataFrame) -> str:
    for col in ("accuracy", "perplexity", "recon_rel_err"):
        if col in df and df[col].notna().any():
            return col
    raise ValueError("no metric column has values")


def tradeoff_plot(df: pd.DataFrame, out: str | Path, x: str = "bits_per_weight", y: str | None = None) -> Path:
    """``y`` (default: accuracy, else perplexity) against ``x``, one line per method, dense as a line."""
    y = y or default_metric(df)
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=150)
    for method, g in df.dropna(subset=[x, y]).groupby("method"):
        g = g.groupby(x, as_index=False)[y].mean().sort_values(x)
        ax.plot(g[x], g[y], marker="o", label=method)
    dense = f"{y}_dense"
    if dense in df and df[dense].notna().any():
        ax.axhline(df[dense].dropna().iloc[0], color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
