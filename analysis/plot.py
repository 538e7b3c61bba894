"""Paper figures with matplotlib: tradeoff curves and Pareto fronts (this module), the per-layer
comparison and ranks per layer (:mod:`analysis.layers`), in the style of :mod:`analysis.style`.

Tradeoff lines join the best configuration at each x (all configurations are drawn as points).
Values are means over seeds, error bars ± one standard deviation over the seeds (ddof=1), or with
one seed ± the evaluation's standard error (:func:`analysis.style.aggregate`: ``err``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.layers import comparison_levels, layer_frame, layer_plot, layer_types, rank_frame, rank_plot
from analysis.style import (COLUMN_WIDTH, GROUP_KEYS, KNOWN, METRICS, STYLE, TEXT_WIDTH, aggregate,
                            available_metrics, better, default_metric, dense_column, direction, label, savefig,
                            set_log, styles, use_log)

__all__ = ["COLUMN_WIDTH", "GROUP_KEYS", "KNOWN", "METRICS", "aggregate", "available_metrics", "better",
           "comparison_levels", "default_metric", "label", "layer_frame", "layer_plot", "layer_types",
           "pareto_mask", "pareto_plot", "rank_frame", "rank_plot", "savefig", "set_log", "styles",
           "tradeoff_plot", "use_log"]


def _facets(df: pd.DataFrame, col: str | None, nrows_per: int = 1, height: float = 2.5):
    keys = sorted(df[col].dropna().unique(), key=str) if col else [None]
    n = len(keys)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    width = COLUMN_WIDTH if n == 1 else TEXT_WIDTH
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(zip(keys, axes.flat, strict=False))  # the grid may have more axes than panels


def _dense(df: pd.DataFrame, y: str) -> float | None:
    if y == "speedup":
        return 1.0
    col = dense_column(y)
    if col in df and df[col].notna().any():
        return float(df[col].mean())
    return None


def _scales(ax, x: pd.Series, y: pd.Series, logx: bool | None, logy: bool | None) -> None:
    if use_log(x) if logx is None else logx:
        set_log(ax, "x", 2)
    if use_log(y) if logy is None else logy:
        set_log(ax, "y")


def _prepare(df: pd.DataFrame, x: str, y: str | None, hue: str, col: str | None):
    """(y, rows having x and y, facet column or None, hue styles) shared by the scatter figures."""
    y = y or default_metric(df)
    df = df.dropna(subset=[x, y])
    if df.empty:
        raise ValueError(f"no rows have both {x} and {y}")
    col = col if col and col in df and df[col].nunique() > 1 else None
    return y, df, col, styles(df[hue].dropna().unique())


def tradeoff_plot(df: pd.DataFrame, out: str | Path, x: str = "bits_per_weight", y: str | None = None,
                  hue: str = "method", col: str | None = "model", logx: bool | None = None,
                  logy: bool | None = None) -> Path:
    """``y`` against ``x``: one line per ``hue``, one panel per ``col``, mean ± std over seeds (one
    seed: ± the evaluation's standard error)."""
    y, df, col, sty = _prepare(df, x, y, hue, col)
    with plt.rc_context(STYLE):
        fig, panels = _facets(df, col)
        for key, ax in panels:
            part = df if key is None else df[df[col] == key]
            keys = [hue] + [k for k in GROUP_KEYS if k not in (hue, col, x)]
            agg = aggregate(part, keys + [x], y)
            # the line joins, at each x, the best configuration there (several may share an x:
            # rank 64 at 4 bits and rank 32 at 8 bits); every configuration is drawn as a point
            pick = {"max": "max", "min": "min"}.get(direction(y), "mean")
            line = agg.groupby([hue, x], sort=True)["mean"].agg(pick).reset_index()
            for h, g in line.groupby(hue, sort=False):
                color, marker = sty[h]
                pts = agg[agg[hue] == h]
                ax.errorbar(pts[x], pts["mean"], yerr=pts["err"], fmt="none", ecolor=color, capsize=2, lw=0.8)
                ax.plot(pts[x], pts["mean"], ls="none", marker=marker, color=color)
                ax.plot(g[x], g["mean"], marker=marker, color=color, label=str(h))
            _finish_panel(ax, key, part, x, y, part[x], part[y], logx, logy)
        _legend(fig, panels)
        return savefig(fig, out)


def _finish_panel(ax, key, part: pd.DataFrame, x: str, y: str, xs, ys, logx, logy) -> None:
    """Dense reference line, axis scales from the plotted values, labels and the facet title."""
    dense = _dense(part, y)
    if dense is not None:
        ax.axhline(dense, color="0.3", ls="--", lw=0.9, label="dense")
    _scales(ax, xs, ys, logx, logy)
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(y))
    if key is not None:
        ax.set_title(str(key))


def _legend(fig, panels) -> None:
    handles, labels = {}, []
    for _, ax in panels:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if len(panels) == 1:
        panels[0][1].legend(handles.values(), labels)
    else:
        fig.legend(handles.values(), labels, loc="outside upper center", ncols=min(len(labels), 6))


def pareto_mask(x: Sequence[float], y: Sequence[float], x_better: str = "max", y_better: str = "max") -> np.ndarray:
    """True for points no other point dominates (at least as good in both, better in one).

    Points with NaN are never on the front; identical points are all on it.
    """
    a = np.asarray(x, dtype=float) * (1 if x_better == "max" else -1)
    b = np.asarray(y, dtype=float) * (1 if y_better == "max" else -1)
    valid = ~(np.isnan(a) | np.isnan(b))
    front = valid.copy()
    for i in np.flatnonzero(valid):
        ge = (a[valid] >= a[i]) & (b[valid] >= b[i])
        gt = (a[valid] > a[i]) | (b[valid] > b[i])
        front[i] = not (ge & gt).any()
    return front


def pareto_plot(df: pd.DataFrame, out: str | Path, x: str = "compression_ratio", y: str | None = None,
                hue: str = "method", col: str | None = "model", logx: bool | None = None,
                logy: bool | None = None) -> Path:
    """Configurations (mean over seeds) over (``x``, ``y``); the front per panel in full colour,
    dominated points faded; the dense model as a line."""
    y, df, col, sty = _prepare(df, x, y, hue, col)
    with plt.rc_context(STYLE):
        fig, panels = _facets(df, col)
        for key, ax in panels:
            part = df if key is None else df[df[col] == key]
            keys = list(dict.fromkeys([hue] + [k for k in GROUP_KEYS if k != col]))
            xs = aggregate(part, keys, x).rename(columns={"mean": x})
            ys = aggregate(part, keys, y)
            pts = xs[keys + [x]].merge(ys, on=keys)
            pts["front"] = pareto_mask(pts[x], pts["mean"], better(x), better(y))
            for h, g in pts.groupby(hue, sort=False):
                color, marker = sty[h]
                for on_front, alpha in ((False, 0.25), (True, 1.0)):
                    s = g[g["front"] == on_front]
                    ax.errorbar(s[x], s["mean"], yerr=s["err"], fmt=marker, color=color, alpha=alpha, capsize=2,
                                lw=0.8, label=str(h) if on_front or not g["front"].any() else None)
            front = pts[pts["front"]].sort_values(x)
            ax.plot(front[x], front["mean"], color="0.2", lw=0.8, zorder=0, drawstyle="steps-post"
                    if better(x) == better(y) else "steps-pre", label="Pareto front")
            _finish_panel(ax, key, part, x, y, pts[x], pts["mean"], logx, logy)
        _legend(fig, panels)
        return savefig(fig, out)
