"""``dsmi table``: evaluation reports side by side (training.table)."""

from __future__ import annotations

import argparse
import sys

from training.table import format_table, load_figures, plot_runs

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Print the figures of evaluation reports side by side: report.json "
                          "files, dsmi repeat summary.json files, or run folders holding them.")
    parser.add_argument("paths", nargs="+", help="report.json / summary.json / run folders")
    parser.add_argument("--protocol", default="single-shot",
                        choices=("single-shot", "all-gallery"))
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    parser.add_argument("--plot", metavar="PNG", help="also draw the runs' CMC curves into PNG")
    parser.add_argument("--title", help="title of the --plot figure")


def run(args: argparse.Namespace) -> int:
    rows = [load_figures(p, args.protocol) for p in args.paths]
    print(format_table(rows, markdown=args.markdown))
    if args.plot:
        try:
            print(f"CMC curves: {plot_runs(rows, args.plot, args.title)}")
        except ValueError as exc:
            print(f"dsmi table: {exc}", file=sys.stderr)
            return 2
    return 0
