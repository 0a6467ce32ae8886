"""``dsmi export``: a checkpoint or variant to ONNX for the service (model.export)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model.export import EXPORTERS, export_model, verify_export

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint written by training")
    source.add_argument("--variant", help="export a randomly initialised model of this variant "
                                          "(for tests and benchmarks)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random initialisation with --variant (default 0)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="legacy",
                        help="legacy: torch.onnx.export(dynamo=False), the default; "
                             "dynamo: torch.export based")
    parser.add_argument("--calibration", type=Path,
                        help="the match probability's calibration.json (default: the one "
                             "beside --checkpoint, written by dsmi train, if any)")
    parser.add_argument("--mirror-average", action="store_true",
                        help="bake test-time flip into the trunk graph: each image's map is "
                             "averaged with its mirror image's (the trunk runs twice)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip comparing ONNX Runtime's scores with PyTorch's")


def run(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        from model.checkpoint import load_checkpoint
        net, _ = load_checkpoint(args.checkpoint)
    else:
        from model.factory import build_model
        torch.manual_seed(args.seed)
        net = build_model(args.variant)
    net.eval()
    net.mirror_average = args.mirror_average
    from training.calibration import read_calibration
    source = args.calibration or args.checkpoint
    calibration = read_calibration(source) if source is not None else None
    if args.calibration is not None and calibration is None:
        print(f"error: no calibration at {args.calibration}")
        return 2
    manifest = export_model(net, args.out, opset=args.opset, exporter=args.exporter,
                            calibration=calibration)
    total = sum(manifest.files.values())
    print(f"exported {manifest.variant} (model id {manifest.model_id}) to {args.out} "
          f"with {manifest.exporter}, opset {manifest.opset}")
    for file, size in manifest.files.items():
        print(f"  {file:<16} {size / 1e6:9.2f} MB")
    print(f"  {'total':<16} {total / 1e6:9.2f} MB")
    print("match probability: " + (f"a={calibration.a:.3f} b={calibration.b:.3f} "
                                   f"({calibration.fitted_on})" if calibration else
                                   "none (no calibration.json beside the checkpoint)"))
    if not args.no_verify:
        diff = verify_export(net, args.out)
        print(f"ONNX Runtime vs PyTorch, 8 random images: max |score difference| {diff:.2e}")
        if diff > 1e-4:
            print("error: the exported graphs do not reproduce PyTorch's scores")
            return 1
    return 0
