"""``dsmi evaluate``: CMC and mAP of a checkpoint or a baseline (training.evaluate)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.calibration import read_calibration
from training.evaluate import DATASETS, checkpoint_distances, evaluate_and_write, load_eval_data
from training.report import format_report

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Evaluate a trained checkpoint or a non-learned baseline on a re-id test set: CMC "
        "(single-shot over seeded random galleries, and over the whole gallery) and mAP. "
        "Writes report.json, cmc.png and ranked.png to --out.")
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  dsmi evaluate --baseline histogram --data ../shared/data/cuhk03-labeled.csv "
        "--split val --out runs/eval-hist\n"
        "  dsmi evaluate --checkpoint runs/x/best.pt --data ../shared/data/viper.csv "
        "--dataset viper --viper-seed 3 --out runs/x/eval-viper\n"
        "  dsmi evaluate --checkpoint best.pt --data /data/Market-1501-v15.09.15 "
        "--dataset market1501 --device cuda --out runs/x/eval-market")
    what = parser.add_argument_group("what to evaluate (one of)")
    model = what.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="a checkpoint written by dsmi train")
    model.add_argument("--baseline", choices=("histogram", "pixels"),
                       help="a non-learned baseline: striped HSV histograms or raw pixels")
    what.add_argument("--embedding-only", action="store_true",
                      help="checkpoint: score by the per-image embeddings FC(g) alone (F~ = 0), "
                           "without the gate/IRNN head: what the head adds")
    what.add_argument("--mirror-average", action="store_true",
                      help="checkpoint: average each image's map with its mirror image's "
                           "(test-time flip; the trunk runs twice)")
    data = parser.add_argument_group("data and protocol")
    data.add_argument("--data", type=Path, required=True,
                      help="a manifest CSV (path,pid,camid,split) or an official-layout root")
    data.add_argument("--dataset", choices=DATASETS, default=None,
                      help="the protocol: required for an official layout; 'viper' on a "
                           "manifest applies the VIPeR 316/316 split (default: manifest)")
    data.add_argument("--split", default=None,
                      help="manifest: the split to evaluate (default val); CUHK03 .mat: val "
                           "or test of the random 1160/100/100 split (default test)")
    data.add_argument("--split-seed", "--viper-seed", dest="split_seed", type=int, default=0,
                      help="seed of the random identity split (VIPeR 316/316, CUHK03 "
                           "1160/100/100): which half/part is the test set")
    data.add_argument("--cuhk03-boxes", choices=("labeled", "detected"), default="labeled",
                      help="CUHK03 .mat: hand-labeled or detected boxes")
    data.add_argument("--cuhk03-protocol", choices=("random", "official", "new"),
                      default="random",
                      help="CUHK03 .mat: random 1160/100/100 split, one of the 20 official "
                           "test sets, or the 767/700 protocol")
    data.add_argument("--cuhk03-testset", type=int, default=1,
                      help="official CUHK03 test set (1-20) for --cuhk03-protocol official")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--trials", type=int, default=10,
                         help="single-shot: random gallery draws averaged")
    metrics.add_argument("--seed", type=int, default=0, help="single-shot: seed of the draws")
    metrics.add_argument("--max-rank", type=int, default=20, help="CMC length")
    run_opts = parser.add_argument_group("output and execution")
    run_opts.add_argument("--out", type=Path, required=True,
                          help="output folder for report.json, cmc.png, ranked.png")
    run_opts.add_argument("--device", default="cpu", help="torch device for a checkpoint")
    run_opts.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    run_opts.add_argument("--pair-batch", type=int, default=4096,
                          help="query-gallery pairs scored at once")
    run_opts.add_argument("--workers", type=int, default=0, help="data loader workers")
    run_opts.add_argument("--ranked-queries", type=int, default=6,
                          help="queries shown in ranked.png")
    run_opts.add_argument("--save-distances", action="store_true",
                          help="also write distances.npz (distances, pids, camids, paths)")
    run_opts.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from training.baselines import baseline_distance

    progress = not args.no_progress
    started = time.perf_counter()
    try:
        data = load_eval_data(args.data, args.dataset, args.split, args.split_seed,
                              args.cuhk03_boxes, args.cuhk03_protocol, args.cuhk03_testset,
                              progress=progress)
        print(f"{data.protocol}: {len(data.queries)} queries, {len(data.gallery)} gallery "
              "images", file=sys.stderr)
        t0 = time.perf_counter()
        if args.checkpoint is not None:
            dist, model_info = checkpoint_distances(
                args.checkpoint, data.queries, data.gallery, device=args.device,
                batch_size=args.batch_size, pair_batch=args.pair_batch,
                num_workers=args.workers, progress=progress,
                embedding_only=args.embedding_only, mirror_average=args.mirror_average)
        else:
            if args.embedding_only:
                raise ValueError("--embedding-only applies to a --checkpoint, not a baseline")
            dist = baseline_distance(args.baseline, data.queries, data.gallery,
                                     progress=progress)
            model_info = {"kind": "baseline", "name": args.baseline, "variant": None,
                          "checkpoint": None}
        meta = {"dataset": data.dataset, "data": str(Path(args.data).resolve()),
                "split": data.split, "query_gallery": data.protocol, **data.details,
                "model": model_info,
                "options": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items() if not k.startswith("_")},
                "timing_s": {"distances": round(time.perf_counter() - t0, 3)}}
        # The probability is calibrated for the head's scores, not the embedding alone's.
        calibration = (read_calibration(args.checkpoint)
                       if args.checkpoint is not None and not args.embedding_only else None)
        report = evaluate_and_write(dist, data.queries, data.gallery, args.out, meta=meta,
                                    trials=args.trials, seed=args.seed,
                                    max_rank=args.max_rank, keep_pids=data.keep_pids,
                                    ranked_queries=args.ranked_queries,
                                    save_distances=args.save_distances,
                                    calibration=calibration)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"dsmi evaluate: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - started
    print(format_report(report))
    out = Path(args.out)
    print(f"wrote {out / 'report.json'}, {out / 'cmc.png'}, {out / 'ranked.png'} "
          f"in {total:.1f}s")
    return 0
