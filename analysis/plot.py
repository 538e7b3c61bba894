"""Paper figures with matplotlib: tradeoff curves, Pareto fronts, the per-layer comparison.

Tradeoff lines join the best configuration at each x (all configurations are drawn as points).

Every figure is written as PNG and PDF (same stem), in one style sized for a paper column
(3.4 in per panel, 8 pt text); a method keeps its colour and marker in every figure.
Values are means over seeds, error bars ± one standard deviation (ddof=1).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

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
HIGHER_BETTER = {"accuracy", "accuracy_dense", "speedup", "compression_ratio", "cosine_similarity"}
LOWER_BETTER = {"perplexity", "perplexity_dense", "recon_rel_err", "latency_ms", "bits_per_weight", "rank",
                "bits", "bits_compressed", "params_compressed", "compress_seconds", "wall_seconds"}
LABELS = {"bits_per_weight": "bits per weight", "compression_ratio": "compression ratio (×)",
          "recon_rel_err": r"relative error $\|W-\hat W\|_F/\|W\|_F$", "latency_ms": "latency (ms)",
          "speedup": "speedup over dense (×)", "cosine_similarity": "cosine similarity to dense"}
METRICS = ("accuracy", "perplexity", "recon_rel_err", "speedup", "latency_ms", "cosine_similarity")
GROUP_KEYS = ("model", "method", "rank", "bits", "budget", "param_ratio", "allocation", "heal")  # one configuration; seeds are repeats


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


def _direction(col: str) -> str | None:
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


def aggregate(df: pd.DataFrame, keys: Sequence[str], y: str) -> pd.DataFrame:
    """Mean, std (ddof=1, 0 for a single seed) and count of ``y`` per ``keys``."""
    keys = list(dict.fromkeys(keys))
    d = df.dropna(subset=[y]).copy()
    for k in keys:  # a key column that is all NaN (e.g. budget) must not drop every row
        d[k] = d[k].astype(object).where(d[k].notna(), "—")
    g = d.groupby(keys, sort=True, dropna=False)[y].agg(["mean", "std", "count"]).reset_index()
    g["std"] = g["std"].fillna(0.0)
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


def _facets(df: pd.DataFrame, col: str | None, nrows_per: int = 1, height: float = 2.5):
    keys = sorted(df[col].dropna().unique(), key=str) if col else [None]
    n = len(keys)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    width = COLUMN_WIDTH if n == 1 else TEXT_WIDTH
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(zip(keys, axes.flat))


def _dense(df: pd.DataFrame, y: str) -> float | None:
    if y == "speedup":
        return 1.0
    col = f"{y}_dense"
    if col in df and df[col].notna().any():
        return float(df[col].mean())
    return None


def set_log(ax, which: str = "y", base: int = 10) -> None:
    """Log scale with plain tick labels (0.5, 2, 100), no labelled minor ticks."""
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(mticker.LogLocator(base, subs=(1.0, 2.0, 5.0) if base == 10 else (1.0,), numticks=6))
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mticker.NullFormatter())


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
    """``y`` against ``x``: one line per ``hue``, one panel per ``col``, mean ± std over seeds."""
    y, df, col, sty = _prepare(df, x, y, hue, col)
    with plt.rc_context(STYLE):
        fig, panels = _facets(df, col)
        for key, ax in panels:
            part = df if key is None else df[df[col] == key]
            keys = [hue] + [k for k in GROUP_KEYS if k not in (hue, col, x)]
            agg = aggregate(part, keys + [x], y)
            # the line joins, at each x, the best configuration there (several may share an x:
            # rank 64 at 4 bits and rank 32 at 8 bits); every configuration is drawn as a point
            pick = {"max": "max", "min": "min"}.get(_direction(y), "mean")
            line = agg.groupby([hue, x], sort=True)["mean"].agg(pick).reset_index()
            for h, g in line.groupby(hue, sort=False):
                color, marker = sty[h]
                pts = agg[agg[hue] == h]
                ax.errorbar(pts[x], pts["mean"], yerr=pts["std"], fmt="none", ecolor=color, capsize=2, lw=0.8)
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
        for h, lab in zip(*ax.get_legend_handles_labels()):
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
                    ax.errorbar(s[x], s["mean"], yerr=s["std"], fmt=marker, color=color, alpha=alpha, capsize=2,
                                lw=0.8, label=str(h) if on_front or not g["front"].any() else None)
            front = pts[pts["front"]].sort_values(x)
            ax.plot(front[x], front["mean"], color="0.2", lw=0.8, zorder=0, drawstyle="steps-post"
                    if better(x) == better(y) else "steps-pre", label="Pareto front")
            _finish_panel(ax, key, part, x, y, pts[x], pts["mean"], logx, logy)
        _legend(fig, panels)
        return savefig(fig, out)


# ---- the per-layer comparison (LPLR paper, layer-wise study) --------------------------------------

def layer_types(names: Sequence[str]) -> dict[str, str]:
    """Layer name → type: the shortest trailing part after the block number that tells types apart.

    ``encoder.layer.3.attention.self.query`` → ``query``; ``...3.attention.output.dense`` →
    ``attention.output.dense`` (``dense`` and ``output.dense`` are taken by other types);
    ``model.layers.3.self_attn.q_proj`` → ``q_proj``.
    """
    rests = {n: _split(n)[1] for n in names}
    parts = {r: r.split(".") for r in set(rests.values())}
    short = {}
    for r, p in parts.items():
        for k in range(1, len(p) + 1):
            suffix = p[-k:]
            if not any(q[-k:] == suffix for o, q in parts.items() if o != r):
                break
        short[r] = ".".join(suffix)
    return {n: short[r] for n, r in rests.items()}


def _split(name: str) -> tuple[int | None, str]:
    """(block number, name after it); (None, name) without a number."""
    m = None
    for m in re.finditer(r"(?:^|\.)(\d+)\.", name):
        pass
    return (int(m.group(1)), name[m.end():]) if m else (None, name)


def comparison_levels(df: pd.DataFrame, reference: str | None = "quant", tol: float = 0.15) -> pd.DataFrame:
    """Configurations (mean bits per weight over seeds) assigned to comparison levels per model.

    With ``reference`` rows, each reference configuration is a level and every other method
    contributes its configuration with the closest bits per weight (within ``tol``, relative).
    Without, configurations whose bits per weight agree within ``tol`` share a level.
    Returns one line per configuration: GROUP_KEYS, bits_per_weight, level.
    """
    keys = list(GROUP_KEYS)
    cfgs = aggregate(df, keys, "bits_per_weight").rename(columns={"mean": "bits_per_weight"})
    cfgs = cfgs[keys + ["bits_per_weight"]]
    out = []
    for model, m in cfgs.groupby("model", sort=False):
        refs = m[m["method"] == reference] if reference else m.iloc[:0]
        if refs.empty:  # greedy bins along bits per weight
            m = m.sort_values("bits_per_weight")
            level, start = [], None
            for b in m["bits_per_weight"]:
                start = b if start is None or b > start * (1 + tol) else start
                level.append(start)
            out.append(m.assign(level=level))
            continue
        for _, r in refs.iterrows():
            q = r["bits_per_weight"]
            others = m[m["method"] != reference].copy()
            others["dist"] = (others["bits_per_weight"] / q - 1).abs()
            others = others[others["dist"] <= tol]
            best = others.loc[others.groupby("method")["dist"].idxmin()] if len(others) else others
            if len(best):  # a level where only the reference sits compares nothing
                out.append(pd.concat([r.to_frame().T, best.drop(columns="dist")]).assign(level=q))
    if not out:
        raise ValueError(f"no configuration is within {tol:.0%} of a {reference} configuration's bits per weight")
    return pd.concat(out, ignore_index=True)


def layer_frame(df: pd.DataFrame, reference: str | None = "quant", tol: float = 0.15) -> pd.DataFrame:
    """Long table of per-layer errors: model, level, method, layer, block, type, order, rel_err
    (mean over seeds), std."""
    df = df[df["layer_errors"].map(lambda d: isinstance(d, dict) and len(d) > 0)]
    if df.empty:
        raise ValueError("no row has layer_errors")
    levels = comparison_levels(df, reference, tol)
    recs = []
    for _, r in df.iterrows():
        for i, (name, err) in enumerate(r["layer_errors"].items()):
            if err is not None:
                recs.append({**{k: r[k] for k in GROUP_KEYS}, "seed": r["seed"], "layer": name, "order": i,
                             "rel_err": float(err)})
    long = pd.DataFrame(recs)
    for k in GROUP_KEYS:
        long[k] = long[k].astype(object).where(long[k].notna(), "—")
        levels[k] = levels[k].astype(object).where(levels[k].notna(), "—")
    long = long.merge(levels[list(GROUP_KEYS) + ["level"]], on=list(GROUP_KEYS))
    types = layer_types(long["layer"].unique())
    long["type"] = long["layer"].map(types)
    long["block"] = long["layer"].map(lambda n: _split(n)[0])
    g = long.groupby(["model", "level", "method", "layer"], sort=False)
    out = g.agg(rel_err=("rel_err", "mean"), std=("rel_err", "std"), order=("order", "min"),
                block=("block", "first"), type=("type", "first")).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out.sort_values(["model", "level", "method", "order"]).reset_index(drop=True)


def layer_plot(df: pd.DataFrame, out: str | Path, reference: str | None = "quant", tol: float = 0.15,
               ratio: bool = False) -> list[Path]:
    """Per model: rows = comparison levels (bits per weight), columns = layer types; x = block in
    model order, y = relative error per method (``ratio``: divided by the reference's error),
    the reference dashed. Returns the PNG paths (one figure per model)."""
    lf = layer_frame(df, reference, tol)
    out = Path(out)
    paths = []
    sty = styles(lf["method"].unique())
    for model, m in lf.groupby("model", sort=False):
        types = list(dict.fromkeys(m.sort_values("order")["type"]))
        levels = sorted(m["level"].unique())
        nc, nr = len(types), len(levels)
        with plt.rc_context(STYLE):
            fig, axes = plt.subplots(nr, nc, figsize=(TEXT_WIDTH, 0.4 + 1.55 * nr), squeeze=False, sharex=True,
                                     layout="constrained")
            for i, level in enumerate(levels):
                lv = m[m["level"] == level]
                ref = lv[lv["method"] == reference].set_index("layer")["rel_err"] if reference else None
                for j, t in enumerate(types):
                    ax = axes[i, j]
                    part = lv[lv["type"] == t]
                    shown = []
                    for meth, g in part.groupby("method", sort=False):
                        color, marker = sty[meth]
                        yv = g["rel_err"] / g["layer"].map(ref).values if ratio and ref is not None and len(ref) \
                            else g["rel_err"]
                        shown.append(yv)
                        xv = g["block"] if g["block"].notna().all() else g["order"]
                        is_ref = meth == reference
                        ax.plot(xv, yv, marker=marker, color="0.2" if is_ref else color, ls="--" if is_ref else "-",
                                label=f"{meth} (reference)" if is_ref else str(meth))
                    if ratio and ref is not None and len(ref):
                        ax.axhline(1.0, color="0.2", ls="--", lw=0.9)
                    if shown and use_log(pd.concat(shown)):
                        set_log(ax, "y")
                    if i == 0:
                        ax.set_title(t, fontsize=7)
                    if j == 0:
                        ax.set_ylabel(f"{level:.3g} bpw\n" + ("error / reference" if ratio else "rel. error"))
                    if i == nr - 1:
                        ax.set_xlabel("block")
                    ax.tick_params(labelsize=6)
            handles, labels = {}, []
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in handles:
                        handles[lab] = h
                        labels.append(lab)
            fig.legend(handles.values(), labels, loc="outside lower center", ncols=min(len(labels), 6))
            what = f"error relative to {reference}" if ratio and reference else "relative error"
            fig.suptitle(f"{model}: per-layer {what} at equal bits per weight", fontsize=8)
            stem = out.with_name(f"{out.stem}_{model}" if lf["model"].nunique() > 1 else out.stem)
            paths.append(savefig(fig, stem.with_suffix(".png")))
    return paths


# ---- ranks per layer (allocation=...) -------------------------------------------------------------

RUN_KEYS = ("method", "allocation", "rank", "bits", "budget", "param_ratio", "heal", "seed")


def rank_frame(df: pd.DataFrame, fraction: bool = False) -> pd.DataFrame:
    """Long table: model, run (a label of the keys that differ between runs), layer, block, type, order,
    value (the rank, or with ``fraction`` the kept fraction r (n + d) / (n d) of the layer's parameters)."""
    has = df["extra"].map(lambda e: isinstance(e, dict) and bool(e.get("layer_ranks")))
    df = df[has]
    if df.empty:
        raise ValueError("no row has extra.layer_ranks")
    keys = [k for k in RUN_KEYS[1:] if k in df.columns and df[k].astype(str).nunique() > 1]
    recs = []
    for _, r in df.iterrows():
        run = ", ".join([str(r["method"]), *(f"{k}={r[k]}" for k in keys)])
        shapes = r["extra"].get("layer_shapes") or {}
        for i, (name, rank) in enumerate(r["extra"]["layer_ranks"].items()):
            if fraction:
                if name not in shapes:
                    continue
                n, d = shapes[name]
                rank = rank * (n + d) / (n * d)
            recs.append({"model": r["model"], "run": run, "layer": name, "order": i, "value": float(rank)})
    long = pd.DataFrame(recs)
    if long.empty:
        raise ValueError("no row has extra.layer_shapes (rows written before allocation=...): plot ranks")
    long["type"] = long["layer"].map(layer_types(long["layer"].unique()))
    long["block"] = long["layer"].map(lambda n: _split(n)[0])
    return long


def rank_plot(df: pd.DataFrame, out: str | Path, fraction: bool = False) -> list[Path]:
    """Per model: one panel per layer type, x = block (depth), y = rank (or kept fraction), one line per
    run. Returns the PNG paths (one figure per model)."""
    rf = rank_frame(df, fraction)
    out = Path(out)
    paths = []
    runs = list(dict.fromkeys(rf["run"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for model, m in rf.groupby("model", sort=False):
        types = list(dict.fromkeys(m.sort_values("order")["type"]))
        with plt.rc_context(STYLE):
            fig, axes = plt.subplots(1, len(types), figsize=(TEXT_WIDTH, 2.0), squeeze=False, sharex=True,
                                     layout="constrained")
            for j, t in enumerate(types):
                ax = axes[0, j]
                for run, g in m[m["type"] == t].groupby("run", sort=False):
                    k = runs.index(run)
                    xv = g["block"] if g["block"].notna().all() else g["order"]
                    ax.plot(xv, g["value"], marker=MARKERS[k % len(MARKERS)], color=colors[k % len(colors)],
                            label=run)
                ax.set_title(t, fontsize=7)
                ax.set_xlabel("block")
                ax.tick_params(labelsize=6)
            axes[0, 0].set_ylabel("kept fraction of parameters" if fraction else "rank")
            handles, labels = axes[0, 0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3))
            fig.suptitle(f"{model}: {'kept fraction' if fraction else 'rank'} per layer", fontsize=8)
            stem = out.with_name(f"{out.stem}_{model}" if rf["model"].nunique() > 1 else out.stem)
            paths.append(savefig(fig, stem.with_suffix(".png")))
    return paths
