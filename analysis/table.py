"""Tables as Markdown or LaTeX (pandas does the formatting).

- ``run_table``: one line per run.
- ``paper_table``: methods as rows, compression levels as (grouped) columns, ``mean ± std``
  over seeds (one seed: ``± the evaluation's standard error``); the best mean of a column is bold
  when it beats the runner-up by more than their combined standard error, otherwise the cells tied
  with it are marked ≈ and none is bold; LaTeX through ``Styler.to_latex`` (booktabs).
- ``sweep_summary``: ok / failed / missing counts per value of each swept axis, and the failed
  runs with their error line.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.load import TABLE_COLUMNS
from analysis.plot import GROUP_KEYS, KNOWN, better
from analysis.style import aggregate, dense_column, stderr_column

FORMATS = ("markdown", "latex", "csv")
NOTE = "best of several configurations at this level (add their keys to the rows or columns to see each)"
TIE_NOTE = ("tied with the column's best: within their combined standard error (of the mean over seeds and "
            "of the evaluation), so no best is bold")
PM_NOTE = "mean ± std over seeds; one seed: ± the evaluation's standard error"
DENSE = "dense"


def _with_stderr(table: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """Each metric that has an evaluation standard error as ``value ± stderr`` (text)."""
    out = table.copy()
    for c in table.columns:
        se = stderr_column(c)
        if se in df and df[se].notna().any() and pd.api.types.is_float_dtype(table[c]):
            out[c] = [("--" if pd.isna(v) else f"{v:.4g}" if pd.isna(e) else f"{v:.4g} ± {e:.2g}")
                      for v, e in zip(table[c], df.loc[table.index, se], strict=True)]
    return out


def run_table(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """One line per run: the identity columns and every metric that has a value; in Markdown and
    LaTeX a metric with an evaluation standard error reads ``value ± stderr``, CSV has its column."""
    cols = [c for c in TABLE_COLUMNS if c in df and (df[c].notna() & (df[c].astype(str) != "none")).any()]
    table = df[cols].sort_values([c for c in ("model", "method", "bits", "rank", "seed") if c in cols])
    if fmt == "markdown":
        return _with_stderr(table, df).reset_index(drop=True).to_markdown(index=False, floatfmt=".4g")
    if fmt == "latex":
        return (_with_stderr(table, df).reset_index(drop=True).style.hide(axis="index")
                .format(precision=4, na_rep="--").to_latex(hrules=True))
    if fmt == "csv":
        ses = [stderr_column(c) for c in cols if stderr_column(c) in df and df[stderr_column(c)].notna().any()]
        return df.loc[table.index, cols + ses].to_csv(index=False)
    raise ValueError(f"format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")


# ---- paper tables --------------------------------------------------------------------------------

def levels(values: pd.Series, tol: float = 0.05, decimals: int = 2) -> pd.Series:
    """Column levels: floats within ``tol`` (relative) of a level's smallest value share the level,
    labelled by their mean rounded to ``decimals`` (3.992 and 4.0 bits per weight: one column)."""
    if not pd.api.types.is_float_dtype(values):
        return values
    uniq = sorted(values.dropna().unique())
    bins, start = {}, None
    for v in uniq:
        start = v if start is None or v > start * (1 + tol) else start
        bins[v] = start
    labels = pd.Series(uniq).groupby(pd.Series(uniq).map(bins)).transform("mean").round(decimals)
    return values.map(dict(zip(uniq, labels, strict=True)))


def paper_cells(df: pd.DataFrame, rows: Sequence[str] = ("method",), cols: Sequence[str] = ("bits_per_weight",),
                metric: str = "accuracy", decimals: int = 2, row_order: Sequence | None = None
                ) -> dict[str, pd.DataFrame]:
    """{mean, std, count, se, sem, configs} of ``metric`` pivoted to ``rows`` × ``cols``.

    mean/std (ddof=1)/count are over the seeds of one configuration (GROUP_KEYS), se/sem as in
    :func:`analysis.style.aggregate` (the evaluation's standard error; the mean's). When several
    configurations fall into one cell (e.g. rank 64 at 8 bits and rank 128 at 4 bits both at 2 bits
    per weight), the cell holds the best of them; ``configs`` says how many there were.
    """
    rows, cols = list(rows), list(cols)
    d = df.dropna(subset=[metric]).copy()
    if d.empty:
        raise ValueError(f"no rows have a value for {metric!r}")
    for c in cols:
        d[c] = levels(d[c], decimals=decimals)
    keys = rows + cols
    config = [k for k in GROUP_KEYS if k in d and k not in keys]
    per = aggregate(d, keys + config, metric)
    per = per.sort_values("mean", ascending=better(metric) == "min", kind="stable")
    per["configs"] = per.groupby(keys)["mean"].transform("size")
    best = per.drop_duplicates(keys).set_index(keys)
    stats = ("mean", "std", "count", "se", "sem", "configs")
    pivot = {s: best[s].unstack(cols).sort_index(axis=1) for s in stats}
    order = _row_order(pivot["mean"].index, rows, row_order)
    return {s: pivot[s].loc[order] for s in stats}


def _row_order(index: pd.Index, rows: list[str], row_order: Sequence | None) -> list:
    """``row_order`` (values of the first row key) first, then methods in the figures' order, then
    the rest sorted."""
    first = index.get_level_values(0) if isinstance(index, pd.MultiIndex) else index
    known = list(row_order or []) + (KNOWN if rows[0] == "method" else [])
    rank = {v: i for i, v in reversed(list(enumerate(known)))}
    pos = sorted(range(len(index)), key=lambda i: (rank.get(first[i], len(rank)), str(first[i]), i))
    return [index[i] for i in pos]


def level_label(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _cell(mean: float, std: float, n: float, se: float, digits: int, pm: str) -> str:
    """``mean ± std`` over n >= 2 seeds, ``mean ± se`` (the evaluation's) for one seed or seeds that agree
    exactly (a deterministic method), ``mean`` without either."""
    if pd.isna(mean):
        return "--"
    err = std if n >= 2 and std > 0 else se
    return f"{mean:.{digits}f}" if pd.isna(err) else f"{mean:.{digits}f}{pm}{err:.{digits}f}"


def best_marks(mean: pd.DataFrame, sem: pd.DataFrame, direction: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(bold, tie) masks: in each column the best mean is bold when it beats every other cell by more
    than their combined standard error sqrt(sem_best² + sem_other²); otherwise it and the cells within
    that distance of it are tied (none bold)."""
    bold = pd.DataFrame(False, index=mean.index, columns=mean.columns)
    tie = bold.copy()
    sign = 1 if direction == "max" else -1
    for c in mean.columns:
        m = mean[c].dropna()
        if m.empty:
            continue
        top = (sign * m).idxmax()
        gap = sign * (m[top] - m)
        combined = (sem[c].fillna(0.0)[m.index] ** 2 + (0.0 if pd.isna(sem.at[top, c]) else sem.at[top, c]) ** 2) ** 0.5
        tied = (gap <= combined) & (m.index != top)
        if tied.any():
            tie.loc[tied[tied].index.append(pd.Index([top])), c] = True
        else:
            bold.at[top, c] = True
    return bold, tie


def paper_frame(df: pd.DataFrame, rows: Sequence[str] = ("method",), cols: Sequence[str] = ("bits_per_weight",),
                metric: str = "accuracy", digits: int = 3, decimals: int = 2, pm: str = " ± ",
                dense: bool = True, row_order: Sequence | None = None, dagger: str = " †", tie_mark: str = " ≈"
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cell strings, bold mask): the best mean per column is bold when it beats the runner-up by
    more than their combined standard error (:func:`best_marks`), else ``tie_mark`` marks the tied
    cells; a ``dense`` row (mean of the dense model's value ± its evaluation standard error) comes
    first when the rows have it, never bold; ``dagger`` marks a cell that is the best of several
    configurations."""
    p = paper_cells(df, rows, cols, metric, decimals, row_order)
    mean = p["mean"]
    bold, tie = best_marks(mean, p["sem"], better(metric))
    cells = pd.DataFrame({c: [_cell(m, s, n, e, digits, pm) + (dagger if k > 1 else "") + (tie_mark if t else "")
                              for m, s, n, e, k, t in zip(mean[c], p["std"][c], p["count"][c], p["se"][c],
                                                          p["configs"][c], tie[c], strict=True)]
                          for c in mean.columns}, index=mean.index)
    cells.columns = mean.columns
    dense_col = dense_column(metric)
    if dense and dense_col in df and df[dense_col].notna().any():
        key = (DENSE,) * len(rows) if len(rows) > 1 else DENSE
        vals = df[dense_col].dropna()
        se_col = stderr_column(dense_col)
        se = df[se_col].mean() if se_col in df else float("nan")
        top = pd.DataFrame([[_cell(vals.mean(), vals.std(), 1, se, digits, pm)] * len(cells.columns)],
                           index=pd.MultiIndex.from_tuples([key], names=rows) if len(rows) > 1 else
                           pd.Index([key], name=rows[0]), columns=cells.columns)
        cells = pd.concat([top, cells])
        bold = pd.concat([pd.DataFrame(False, index=top.index, columns=bold.columns), bold])
    return cells, bold


def _column_names(columns: pd.Index, cols: Sequence[str]) -> list[str]:
    if isinstance(columns, pd.MultiIndex):
        return [" / ".join(f"{c}={v}" for c, v in zip(cols, key, strict=True)) for key in columns]
    return [f"{cols[0]}={v}" for v in columns]


def paper_table(df: pd.DataFrame, rows: Sequence[str] = ("method",), cols: Sequence[str] = ("bits_per_weight",),
                metric: str = "accuracy", fmt: str = "markdown", digits: int = 3, decimals: int = 2,
                caption: str | None = None, row_order: Sequence | None = None) -> str:
    """The paper table as Markdown (``**best**``), LaTeX (booktabs, ``\\textbf{best}``) or CSV."""
    rows, cols = list(rows), list(cols)
    if fmt == "latex":
        cells, bold = paper_frame(df, rows, cols, metric, digits, decimals, pm=r" $\pm$ ", row_order=row_order,
                                  dagger=r"$^\dagger$", tie_mark=r"$^{\approx}$")
        cells.columns = cells.columns.set_names([c.replace("_", " ") for c in cols])
        cells.index = cells.index.set_names([r.replace("_", " ") for r in rows])
        styler = cells.style.apply(lambda _: bold.map(lambda b: "textbf:--rwrap;" if b else "").values, axis=None)
        styler = styler.format_index(level_label, axis=1)
        n_idx = len(rows)
        tex = styler.to_latex(hrules=True, multicol_align="c", caption=caption,
                              column_format="l" * n_idx + "c" * len(cells.columns), position_float="centering")
        for mark, note in ((r"$^\dagger$", NOTE), (r"$^{\approx}$", TIE_NOTE)):
            if cells.map(lambda c, mark=mark: mark in c).any().any():
                tex = tex.replace("\\end{tabular}\n", f"\\end{{tabular}}\n\\\\[2pt]{{\\footnotesize {mark} {note}}}\n")
        return tex
    cells, bold = paper_frame(df, rows, cols, metric, digits, decimals, row_order=row_order)
    if fmt == "markdown":
        out = cells.where(~bold, "**" + cells + "**")
        out.columns = _column_names(out.columns, cols)
        md = out.reset_index().to_markdown(index=False, colalign=("left",) * len(rows) + ("right",) * out.shape[1])
        notes = [f"{mark} {note}" for mark, note in (("†", NOTE), ("≈", TIE_NOTE))
                 if cells.map(lambda c, mark=mark: f" {mark}" in c).any().any()]
        return md + "".join(f"\n\n{n}" for n in notes)
    if fmt == "csv":
        out = cells.copy()
        out.columns = _column_names(out.columns, cols)
        return out.reset_index().to_csv(index=False)
    raise ValueError(f"format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")


# ---- sweep summary --------------------------------------------------------------------------------

AXES = ("model", "method", "rank", "bits", "budget", "param_ratio", "allocation", "seed")


def _same(a: object, b: object) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _column(df: pd.DataFrame, key: str) -> str:
    return key if key in df else f"config.{key}"


def expected_grid(df: pd.DataFrame, results_dirs: Sequence[str | Path] = ()) -> pd.DataFrame:
    """The grid of swept values: from each sweep's ``hydra/<sweep>/multirun.yaml`` (command-line
    sweep overrides and ``hydra.sweeper.params``), else the product of the values seen in rows."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    grids = []
    parser = OverridesParser.create()
    for d in results_dirs:
        for path in sorted(Path(d).glob("hydra/*/multirun.yaml")):
            h = OmegaConf.load(path).hydra
            args = [f"{k}={v}" for k, v in (h.sweeper.get("params") or {}).items()] + list(h.overrides.task)
            axes = {}
            for o in parser.parse_overrides(args):
                axes[o.key_or_group] = list(o.sweep_string_iterator()) if o.is_sweep_override() else None
            axes = {k: v for k, v in axes.items() if v is not None}
            if axes:
                grids.append(pd.DataFrame(list(itertools.product(*axes.values())), columns=list(axes)))
    if grids:
        return pd.concat(grids, ignore_index=True).drop_duplicates().reset_index(drop=True)
    axes = {a: list(df[a].dropna().unique()) for a in AXES if a in df and df[a].nunique() > 1}
    axes = axes or {"method": list(df["method"].dropna().unique())}
    return pd.DataFrame(list(itertools.product(*axes.values())), columns=list(axes))


def sweep_summary(df: pd.DataFrame, results_dirs: Sequence[str | Path] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(counts, failed): ok / failed / missing grid points per value of each swept axis, and
    the failed runs (run_id, run_name, error_line)."""
    grid = expected_grid(df, results_dirs)
    status = []
    for _, point in grid.iterrows():
        match = pd.Series(True, index=df.index)
        for key, value in point.dropna().items():  # NaN: an axis another sweep of this dir did not have
            col = _column(df, key)
            match &= df[col].map(lambda v, value=value: _same(v, value)) if col in df else False
        found = df.loc[match, "ok"]
        status.append("missing" if found.empty else "ok" if found.any() else "failed")
    grid = grid.assign(status=status)
    counts = []
    for key in grid.columns.drop("status"):
        c = grid.groupby(key, sort=False)["status"].value_counts().unstack(fill_value=0)
        for s in ("ok", "failed", "missing"):
            if s not in c:
                c[s] = 0
        c = c[["ok", "failed", "missing"]].reset_index().rename(columns={key: "value"})
        counts.append(c.assign(axis=key)[["axis", "value", "ok", "failed", "missing"]])
    counts = pd.concat(counts, ignore_index=True)
    counts.columns.name = None
    counts["value"] = counts["value"].astype(str)
    failed = df.loc[~df["ok"], ["run_id", "run_name", "error_line"]].reset_index(drop=True)
    return counts, failed


def summary_markdown(df: pd.DataFrame, results_dirs: Sequence[str | Path] = ()) -> str:
    counts, failed = sweep_summary(df, results_dirs)
    total = counts.groupby("axis")[["ok", "failed", "missing"]].sum().iloc[0]
    out = [f"{total['ok']} ok, {total['failed']} failed, {total['missing']} missing", "",
           counts.to_markdown(index=False)]
    if len(failed):
        out += ["", "Failed runs:", "", failed.to_markdown(index=False)]
    return "\n".join(out)
