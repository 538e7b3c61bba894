"""Tables of runs as Markdown or LaTeX (pandas does the formatting)."""

from __future__ import annotations

import pandas as pd

from analysis.load import TABLE_COLUMNS

FORMATS = ("markdown", "latex", "csv")


def run_table(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """One line per run: the identity columns and every metric that has a value."""
    cols = [c for c in TABLE_COLUMNS if c in df and df[c].notna().any()]
    table = df[cols].sort_values([c for c in ("model", "method", "bits", "rank") if c in cols]).reset_index(drop=True)
    if fmt == "markdown":
        return table.to_markdown(index=False, floatfmt=".4g")
    if fmt == "latex":
        return table.style.hide(axis="index").format(precision=4, na_rep="--").to_latex(hrules=True)
    if fmt == "csv":
        return table.to_csv(index=False)
    raise ValueError(f"format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
