"""The table and plot printed at the end of a sweep."""

from __future__ import annotations

from pathlib import Path

from analysis.load import frame
from analysis.plot import tradeoff_plot
from analysis.table import run_table
from lrsweep.row import ResultRow


def print_summary(rows: list[ResultRow], results_dir: str) -> None:
    df = frame(rows)
    ok = df[df["ok"]]
    if ok.empty:
        return
    print(run_table(ok, "markdown"))
    path = tradeoff_plot(ok, Path(results_dir) / "tradeoff.png")
    print(f"[lrsweep] plot: {path}")
