"""``dsmi train``: train a variant (training.train)."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from training.config import describe_fields, load_config
from training.train import Trainer

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train a variant on a re-id dataset with the paper's protocol: batches of 128 images "
        "scored as all pairs, binomial deviance (alpha=2, beta=0.5, 1/n1 and 1/n2 weights), "
        "flip and shift augmentation, early stopping on a validation split carved from the "
        "training identities. Writes a run folder with a JSON-lines log, last.pt every epoch "
        "(also on Ctrl-C), best.pt, and a test report of best.pt.")
    parser.add_argument("--config", default="configs/cpu.yaml",
                        help="YAML config file (default: configs/cpu.yaml; see configs/)")
    parser.add_argument("--out", required=True, help="run folder to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=0.01 "
                             "--set model.variant=fc-cnn-small (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/last.pt (after Ctrl-C or a crash)")
    parser.add_argument("--device", help="cpu or cuda (overrides train.device)")
    parser.add_argument("--max-minutes", type=float,
                        help="wall-clock training budget (overrides train.max_minutes)")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the test evaluation of best.pt at the end")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  dsmi train --config configs/cpu.yaml --out runs/cpu\n"
        "  dsmi train --config configs/cpu.yaml --set model.variant=fc-cnn-small --out runs/fc\n"
        "  dsmi train --config configs/paper.yaml --device cuda --out runs/paper\n"
        "  dsmi train --out runs/viper-ft --set data.protocol=viper --set data.manifest=viper.csv"
        " \\\n      --set train.init_from=runs/cpu/best.pt --set train.pretrain_epochs=0\n\n"
        "config fields (--set KEY=VALUE; built-in defaults, which the config file overrides):\n"
        + textwrap.indent(textwrap.fill(describe_fields(), 96, break_on_hyphens=False), "  "))


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.max_minutes is not None:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary, indent=2))
    from training.plots import plot_training_curve
    out = Path(args.out)
    print(f"held-out curve: {plot_training_curve(out / 'log.jsonl', out / 'curve.png')}")
    if trainer.data.val_queries and trainer.data.val_gallery:
        from training.calibration import calibrate_checkpoint
        try:
            calibration = calibrate_checkpoint(out / "best.pt", trainer.data.val_queries,
                                               trainer.data.val_gallery,
                                               device=cfg.train.device)
        except ValueError as exc:  # a model whose scores do not rank: no probability
            print(f"no match probability: {exc}")
        else:
            print(f"match probability fitted on held-out identities: a={calibration.a:.3f} "
                  f"b={calibration.b:.3f} ({calibration.fitted_on})")
    if not args.no_eval:
        from training.evaluate import evaluate_run
        report = evaluate_run(Path(args.out) / "best.pt", trainer.data, Path(args.out) / "eval",
                              device=cfg.train.device, progress=not args.no_progress)
        print(json.dumps(report.get("summary", report), indent=2))
    return 0
