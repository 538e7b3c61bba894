"""One folder a person can look at: figures (PNG + PDF), tables (Markdown + LaTeX) and index.html.

    python -m analysis report results/ -o report/
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis import plot, table
from analysis.load import load

CSS = """body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}.fail td{color:#a00}.note{color:#666;font-size:.9em}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0;flex:0 1 calc(50% - .5em)}
figcaption{font-size:.85em;color:#555}"""


def _paper_html(df: pd.DataFrame, rows: Sequence[str], cols: Sequence[str], metric: str) -> str:
    cells, bold = table.paper_frame(df, rows, cols, metric)
    styler = cells.style.apply(lambda _: bold.map(lambda b: "font-weight:bold" if b else "").values, axis=None)
    return styler.format_index(table.level_label, axis=1).to_html()


def _figure(path: Path, out: Path, caption: str) -> str:
    rel = os.path.relpath(path, out)
    pdf = os.path.relpath(path.with_suffix(".pdf"), out)
    return (f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" alt="{html.escape(caption)}"></a>'
            f'<figcaption>{html.escape(caption)} (<a href="{html.escape(pdf)}">PDF</a>)</figcaption></figure>')


def build(sources: Sequence[str | Path], out: str | Path, x: str = "bits_per_weight", metric: str | None = None,
          reference: str = "quant", rows: Sequence[str] = ("method",), cols: Sequence[str] = ("bits_per_weight",)
          ) -> Path:
    """Write figures/, tables/ and index.html under ``out``; returns the index.html path."""
    out = Path(out)
    figs, tabs = out / "figures", out / "tables"
    tabs.mkdir(parents=True, exist_ok=True)
    df = load(*sources)
    if df.empty:
        raise ValueError(f"no result rows in {', '.join(map(str, sources))}")
    ok = df[df["ok"]]
    body = [f"<h1>lrsweep report</h1><p class=note>{len(df)} runs from "
            f"{html.escape(', '.join(map(str, sources)))}: {int(df['ok'].sum())} ok, {int((~df['ok']).sum())} failed. "
            "Points are means over seeds, error bars ± one standard deviation over the seeds, or with one seed "
            "± the evaluation's standard error; dashed lines: dense model.</p>"]
    if not ok.empty:
        metrics = plot.available_metrics(ok)
        main = metric or plot.default_metric(ok)
        body.append("<h2>Trade-off</h2><div class=figs>")
        for y in dict.fromkeys([main, "recon_rel_err", "speedup"]):
            if y in metrics:
                p = plot.tradeoff_plot(ok, figs / f"tradeoff_{y}.png", x=x, y=y)
                body.append(_figure(p, out, f"{plot.label(y, False)} against {plot.label(x, False)}"))
        body.append("</div><h2>Pareto front</h2><div class=figs>")
        for y in dict.fromkeys([main, "recon_rel_err"]):
            if y in metrics:
                p = plot.pareto_plot(ok, figs / f"pareto_{y}.png", y=y)
                body.append(_figure(p, out, f"Pareto front of compression ratio and {plot.label(y, False)}; "
                                            "faded: dominated configurations"))
        body.append("</div>")
        if ok["layer_errors"].map(bool).any():
            ref = reference if (ok["method"] == reference).any() else None
            body.append("<h2>Per-layer relative error at equal bits</h2>")
            if ref is None:
                body.append(f"<p class=note>no {html.escape(reference)} rows: methods compared at equal bits per "
                            "weight without a reference</p>")
            try:
                paths = plot.layer_plot(ok, figs / "layers.png", reference=ref)
            except ValueError as e:  # nothing at equal bits to compare
                paths, ref = [], None
                body.append(f"<p class=note>{html.escape(str(e))}</p>")
            for p in paths:
                body.append(_figure(p, out, "per layer in model order, one panel per layer type"
                                    + (f"; dashed: {ref}" if ref else "")))
            if ref:
                for p in plot.layer_plot(ok, figs / "layers_ratio.png", reference=ref, ratio=True):
                    body.append(_figure(p, out, f"the same, each method's error divided by {ref}'s "
                                                "(below 1: better than naive quantization at equal bits)"))
        body.append("<h2>Tables</h2>")
        for y in dict.fromkeys([main, "recon_rel_err"]):
            if y not in metrics:
                continue
            stem = f"paper_{y}"
            (tabs / f"{stem}.md").write_text(table.paper_table(ok, rows, cols, y, "markdown") + "\n")
            (tabs / f"{stem}.tex").write_text(table.paper_table(ok, rows, cols, y, "latex",
                                                                caption=plot.label(y, False).replace("_", " ")))
            body.append(f"<h3>{html.escape(plot.label(y, False))}</h3>{_paper_html(ok, rows, cols, y)}"
                        f"<p class=note><a href='tables/{stem}.tex'>LaTeX</a> · <a href='tables/{stem}.md'>Markdown"
                        f"</a> · bold: best per column by more than the combined standard error; ≈ {table.TIE_NOTE}; "
                        f"{table.PM_NOTE}; † best of several configurations at that level</p>")
        (tabs / "runs.md").write_text(table.run_table(ok, "markdown") + "\n")
    summary = table.summary_markdown(df, [s for s in sources if not str(s).startswith("wandb:")])
    (tabs / "summary.md").write_text(summary + "\n")
    counts, failed = table.sweep_summary(df, [s for s in sources if not str(s).startswith("wandb:")])
    body.append("<h2>Sweep</h2>" + counts.to_html(index=False))
    if len(failed):
        body.append("<h3>Failed runs</h3>" + failed.to_html(index=False, classes="fail"))
    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>lrsweep report</title>"
                     f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return index
