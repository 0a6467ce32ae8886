"""``dsmi calibrate``: fit a run's match probability on its held-out identities
(training.calibration)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fit the match probability (Platt scaling at even prior odds) of a run's checkpoint on "
        "the identities its config held out of training, and write calibration.json beside "
        "the checkpoint, where 'dsmi export' and 'dsmi evaluate' find it. 'dsmi train' does "
        "this at its end.")
    parser.add_argument("--run", type=Path, required=True,
                        help="a run folder of 'dsmi train' (its config.yaml and best.pt)")
    parser.add_argument("--checkpoint", default="best.pt",
                        help="the checkpoint in the run folder (default best.pt)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mirror-average", action="store_true",
                        help="calibrate the scores of the model with test-time flip, as "
                             "'dsmi export --mirror-average' exports it")


def run(args: argparse.Namespace) -> int:
    from training.calibration import calibrate_checkpoint
    from training.config import load_config
    from training.protocols import prepare_data

    cfg = load_config(args.run / "config.yaml")
    data = prepare_data(cfg.data)
    calibration = calibrate_checkpoint(args.run / args.checkpoint, data.val_queries,
                                       data.val_gallery, device=args.device,
                                       mirror_average=args.mirror_average)
    print(f"match probability: a={calibration.a:.4f} b={calibration.b:.4f} "
          f"({calibration.fitted_on}) -> {args.run / 'calibration.json'}")
    return 0
