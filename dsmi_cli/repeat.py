"""``dsmi repeat``: train and evaluate over seeded splits (training.experiment)."""

from __future__ import annotations

import argparse

from training.experiment import repeat

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train and evaluate a config on several seeded splits (data.split_seed = 0..N-1), e.g. "
        "VIPeR's 10 random 316/316 splits, or evaluate a baseline on the same splits; writes "
        "OUT/split-K/ per split and OUT/summary.json with the mean and standard deviation.")
    parser.add_argument("--config", default="configs/cpu.yaml", help="YAML config file")
    parser.add_argument("--out", required=True, help="folder for the runs and summary.json")
    parser.add_argument("--splits", type=int, default=10, help="number of splits (default 10)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--baseline", choices=("histogram", "pixels"),
                        help="evaluate this non-learned baseline instead of training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    summary = repeat(args.config, args.overrides, args.out, args.splits, args.baseline,
                     progress=not args.no_progress)
    from training.table import format_table

    print(format_table([(summary["name"], summary["mean"]["single-shot"])]))
    return 0
