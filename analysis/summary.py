"""The table and plot printed at the end of a sweep."""

from __future__ import annotations

from pathlib import Path

from analysis.load import frame
from analysis.plot import default_metric, tradeoff_plot
from analysis.table import run_table
from lrsweep.row import ResultRow


def print_summary(rows: list[ResultRow], results_dir: str) -> None:
    df = frame(rows)
    ok = df[df["ok"]]
    if ok.empty:
        return
    print(run_table(ok, "markdown"))
    try:
        y = default_metric(ok)
    except ValueError:
        return  # no metric to draw
    if ok[["bits_per_weight", y]].dropna().empty:
        return
    path = tradeoff_plot(ok, Path(results_dir) / "tradeoff.png", y=y)
    print(f"[lrsweep] plot: {path} (.pdf next to it); report: python -m analysis report {results_dir} -o report/")
