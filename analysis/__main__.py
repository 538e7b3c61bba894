"""python -m analysis plot|table|report <results_dir or wandb:entity/project> ...

    python -m analysis plot results/ --x bits_per_weight --y accuracy --hue method --col model
    python -m analysis plot results/ --kind pareto --y recon_rel_err -o pareto.png
    python -m analysis plot results/ --kind layers --reference quant -o layers.png
    python -m analysis plot results/ --kind ranks --query "param_ratio == 0.6" [--fraction] -o ranks.png
    python -m analysis table results/ --kind paper --rows method --cols bits_per_weight --metric accuracy --format latex
    python -m analysis table results/ --kind summary
    python -m analysis report results/ -o report/
"""

from __future__ import annotations

import argparse
import sys

from analysis import plot, report
from analysis.load import load
from analysis.table import FORMATS, paper_table, run_table, summary_markdown

SCALES = {"auto": None, "log": True, "linear": False}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("sources", nargs="+", help="results dirs and/or wandb:<entity>/<project>")
    common.add_argument("--query", default=None, help="pandas query on the rows, e.g. 'bits == 4'")

    t = sub.add_parser("table", parents=[common], help="runs, paper table or sweep summary")
    t.add_argument("--kind", choices=("runs", "paper", "summary"), default="runs")
    t.add_argument("--format", choices=FORMATS, default="markdown")
    t.add_argument("--rows", nargs="+", default=["method"])
    t.add_argument("--cols", nargs="+", default=["bits_per_weight"], help="column groups, outermost first")
    t.add_argument("--metric", default=None)
    t.add_argument("--row-order", nargs="+", default=None, help="first row values in this order (default: "
                   "methods in the figures' order)")
    t.add_argument("--digits", type=int, default=3)
    t.add_argument("--decimals", type=int, default=2, help="rounding of float column levels")

    pl = sub.add_parser("plot", parents=[common], help="tradeoff, pareto or per-layer figure (PNG + PDF)")
    pl.add_argument("--kind", choices=("tradeoff", "pareto", "layers", "ranks"), default="tradeoff")
    pl.add_argument("-o", "--out", default=None, help="output path (.png; a .pdf is written next to it)")
    pl.add_argument("--x", default=None, help="default: bits_per_weight (pareto: compression_ratio)")
    pl.add_argument("--y", default=None)
    pl.add_argument("--hue", default="method")
    pl.add_argument("--col", default="model", help="facet column ('none' for one panel)")
    pl.add_argument("--logx", choices=SCALES, default="auto")
    pl.add_argument("--logy", choices=SCALES, default="auto")
    pl.add_argument("--reference", default="quant", help="layers: the baseline at equal bits")
    pl.add_argument("--ratio", action="store_true", help="layers: error divided by the reference's")
    pl.add_argument("--fraction", action="store_true", help="ranks: the kept fraction of each layer's parameters")

    r = sub.add_parser("report", parents=[common], help="figures + tables + index.html")
    r.add_argument("-o", "--out", default="report")
    r.add_argument("--x", default="bits_per_weight")
    r.add_argument("--metric", default=None)
    r.add_argument("--reference", default="quant")
    r.add_argument("--rows", nargs="+", default=["method"], help="paper table rows")
    r.add_argument("--cols", nargs="+", default=["bits_per_weight"], help="paper table column groups")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "report":
        print(report.build(args.sources, args.out, x=args.x, metric=args.metric, reference=args.reference,
                           rows=args.rows, cols=args.cols))
        return 0
    df = load(*args.sources)
    if args.query and not df.empty:
        df = df.query(args.query)
    if args.cmd == "table" and args.kind == "summary":
        if df.empty:
            print(f"no rows in {' '.join(args.sources)}", file=sys.stderr)
            return 1
        print(summary_markdown(df, [s for s in args.sources if not s.startswith("wandb:")]))
        return 0
    ok = df[df["ok"]] if not df.empty else df
    if ok.empty:
        print(f"no ok rows in {' '.join(args.sources)}", file=sys.stderr)
        return 1
    if args.cmd == "table":
        if args.kind == "runs":
            print(run_table(ok, args.format))
        else:
            print(paper_table(ok, args.rows, args.cols, args.metric or plot.default_metric(ok), args.format,
                              digits=args.digits, decimals=args.decimals, row_order=args.row_order))
        return 0
    col = None if args.col == "none" else args.col
    scales = dict(logx=SCALES[args.logx], logy=SCALES[args.logy])
    if args.kind == "tradeoff":
        print(plot.tradeoff_plot(ok, args.out or "tradeoff.png", x=args.x or "bits_per_weight", y=args.y,
                                 hue=args.hue, col=col, **scales))
    elif args.kind == "pareto":
        print(plot.pareto_plot(ok, args.out or "pareto.png", x=args.x or "compression_ratio", y=args.y,
                               hue=args.hue, col=col, **scales))
    elif args.kind == "ranks":
        for path in plot.rank_plot(ok, args.out or "ranks.png", fraction=args.fraction):
            print(path)
    else:
        ref = args.reference if (ok["method"] == args.reference).any() else None
        for path in plot.layer_plot(ok, args.out or "layers.png", reference=ref, ratio=args.ratio):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
