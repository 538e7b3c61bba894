"""Per-layer figures: the relative error of each layer at equal bits per weight (the LPLR paper's
layer-wise study), and the rank each layer got (``allocation=...``). One figure per model, one
panel per layer type, x = block in model order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis.style import (GROUP_KEYS, MARKERS, STYLE, TEXT_WIDTH, aggregate, savefig, set_log, styles,
                            use_log)


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
    matches = list(re.finditer(r"(?:^|\.)(\d+)\.", name))
    m = matches[-1] if matches else None
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
    for _model, m in cfgs.groupby("model", sort=False):
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
                for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                    if lab not in handles:
                        handles[lab] = h
                        labels.append(lab)
            fig.legend(handles.values(), labels, loc="outside lower center", ncols=min(len(labels), 6))
            what = f"error relative to {reference}" if ratio and reference else "relative error"
            fig.suptitle(f"{model}: per-layer {what} at equal bits per weight", fontsize=8)
            stem = out.with_name(f"{out.stem}_{model}" if lf["model"].nunique() > 1 else out.stem)
            paths.append(savefig(fig, stem.with_suffix(".png")))
    return paths


# ---------------------------------------------------------------- ranks per layer (allocation=...)
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
        if fraction and _spans_layers(str(r["method"])):
            raise ValueError(f"method {r['method']} shares factors across layers: a layer's kept fraction is not "
                             "r (n + d) / (n d); plot the ranks (fraction=False)")
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


def _spans_layers(method: str) -> bool:
    """Whether a registered method's factors may span layers (lrsweep.spanning)."""
    from lrsweep import methods

    spec = methods.REGISTRY.get(method)
    return spec is not None and spec.spans is not None


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
