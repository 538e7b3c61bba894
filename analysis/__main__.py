"""python -m analysis table|plot <results_dir> ..."""

from __future__ import annotations

import argparse
import sys

from analysis.load import load
from analysis.plot import tradeoff_plot
from analysis.table import FORMATS, run_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="one line per run")
    t.add_argument("results_dir", nargs="+")
    t.add_argument("--format", choices=FORMATS, default="markdown")
    pl = sub.add_parser("plot", help="metric vs bits per weight, one line per method")
    pl.add_argument("results_dir", nargs="+")
    pl.add_argument("-o", "--out", default="tradeoff.png")
    pl.add_argument("--x", default="bits_per_weight")
    pl.add_argument("--y", default=None)
    args = p.parse_args(argv)
    df = load(*args.results_dir)
    ok = df[df["status"] == "ok"] if not df.empty else df
    if ok.empty:
        print(f"no ok rows in {' '.join(args.results_dir)}", file=sys.stderr)
        return 1
    if args.cmd == "table":
        print(run_table(ok, args.format))
    else:
        print(tradeoff_plot(ok, args.out, x=args.x, y=args.y))
    return 0


if __name__ == "__main__":
    sys.exit(main())
