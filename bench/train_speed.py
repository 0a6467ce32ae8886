"""Training speed on this machine: today's designs against the trainer before them, in one run.

Each design runs in its own process (the allocator is chosen at process start, with
``LD_PRELOAD``), builds the real :class:`training.train.Trainer` on generated images, and
times ``Trainer.step`` after two warm-up steps: images per second, seconds of kernel time per
step (page faults: the cost a caching allocator removes) and the minutes one CUHK03 epoch
would take (693 training identities; P x K batches visit each once per epoch).

    .venv/bin/python -m bench.train_speed            # bench/results/train-speed.json
    .venv/bin/python -m bench.train_speed --quick    # fewer steps

Designs:

- ``before``: ``configs/cpu.yaml`` as it trained until now (Lite0 cut at stride 16, stem and
  blocks 0-2 frozen, 192x96, the pair loss on all pairs of 128-image batches, bf16 autocast);
- ``phase1``: ``configs/cpu-bnneck.yaml``'s phase 1 (the whole Lite0 but its stem and block 0,
  256x128, batches of 64, identity + triplet losses, channels-last, float32), and the same
  ``phase1-nchw`` (channels first) and ``phase1-bf16``;
- ``phase2``: its phase 2 (the gate/IRNN head alone on all pairs of 128 cached maps).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, write_results

ROOT = Path(__file__).resolve().parents[1]
CUHK03_TRAIN_IDS = 693  # 743 training identities less the 50 held out for early stopping

DESIGNS: dict[str, tuple[str, list[str]]] = {
    "before": ("configs/cpu.yaml", []),
    "phase1": ("configs/cpu-bnneck.yaml", []),
    "phase1-nchw": ("configs/cpu-bnneck.yaml", ["train.channels_last=false"]),
    "phase1-bf16": ("configs/cpu-bnneck.yaml", ["train.precision=bf16"]),
    "phase2": ("configs/cpu-bnneck.yaml", ["train.pretrain_epochs=0"]),
    "phase1-stripes": ("configs/cpu-bnneck.yaml",  # part features (--only)
                       ["model.variant=dsmi-lite0-stripes"]),
}
# (design, allocator) pairs of one run: every design with tcmalloc, the main two with each.
RUNS = [("before", "system"), ("before", "tcmalloc"), ("before", "jemalloc"),
        ("phase1", "system"), ("phase1", "tcmalloc"), ("phase1", "jemalloc"),
        ("phase1-nchw", "tcmalloc"), ("phase1-bf16", "tcmalloc"), ("phase2", "tcmalloc")]


def make_images(root: Path, people: int = 64, per_camera: int = 4) -> Path:
    """Random-coloured people, two cameras: enough identities for P x K batches."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for pid in range(people):
        colours = rng.integers(0, 256, (2, 3))
        for cam in (1, 2):
            for k in range(per_camera):
                pixels = np.zeros((160, 64, 3), np.uint8)
                pixels[:80], pixels[80:] = colours
                pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255)
                name = f"{pid:04d}_{cam}_{k}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(root / name)
                rows.append((name, pid, cam, "train" if pid < people - 8 else "test"))
    with (root / "speed.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "pid", "camid", "split"), *rows])
    return root / "speed.csv"


def worker(design: str, manifest: Path, steps: int) -> dict:
    """Build the design's trainer and time ``steps`` optimisation steps -> figures."""
    from training.config import load_config
    from training.train import Trainer

    config, extra = DESIGNS[design]
    overrides = [f"data.root={manifest.parent}", f"data.manifest={manifest.name}",
                 "data.test_split=test", "data.val_ids=8", "model.overrides.weights=null",
                 "train.max_minutes=null", "train.pretrain_minutes=null", *extra]
    cfg = load_config(ROOT / config, overrides)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, progress=False)
        trainer.train_mode()
        timings, kernel, images = [], [], 0
        epoch = 0
        while len(timings) < steps + 2:
            trainer.state.epoch = epoch
            for batch in trainer.batches():
                before = resource.getrusage(resource.RUSAGE_SELF)
                started = time.perf_counter()
                trainer.step(*batch)
                timings.append(time.perf_counter() - started)
                after = resource.getrusage(resource.RUSAGE_SELF)
                kernel.append(after.ru_stime - before.ru_stime)
                if len(timings) > 2:
                    images += len(batch[1])
                if len(timings) >= steps + 2:
                    break
            epoch += 1
        batch_size = len(batch[1])
    measured = timings[2:]
    per_step = float(np.mean(measured))
    ids_per_batch = batch_size // cfg.train.instances_per_id
    return {"design": design, "config": config, "overrides": extra,
            "variant": cfg.model.variant, "input_size": list(trainer.net.input_size),
            "batch": batch_size, "steps": len(measured),
            "images_per_s": images / sum(measured), "s_per_step": per_step,
            "kernel_s_per_step": float(np.mean(kernel[2:])),
            "cuhk03_epoch_min": CUHK03_TRAIN_IDS // ids_per_batch * per_step / 60,
            "preload": os.environ.get("LD_PRELOAD", "")}


def run_one(design: str, allocator: str, manifest: Path, steps: int) -> dict:
    from dsmi_cli.allocator import ALLOCATORS, find_allocator

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if allocator != "system":
        path = find_allocator(allocator)
        if path is None:
            return {"design": design, "allocator": allocator,
                    "skipped": f"{allocator} not installed ({ALLOCATORS[allocator][1]})"}
        env["LD_PRELOAD"] = str(path)
    out = subprocess.run([sys.executable, "-m", "bench.train_speed", "--worker", design,
                          "--manifest", str(manifest), "--steps", str(steps)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "allocator": allocator}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps instead of 8")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/train-speed.json")
    parser.add_argument("--only", nargs="+", metavar="DESIGN:ALLOCATOR",
                        help="run only these of the run's pairs, e.g. before:system "
                             "before:tcmalloc (the first is the baseline of the ratios)")
    parser.add_argument("--worker", choices=DESIGNS, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.manifest, args.steps)))
        return 0
    steps = 3 if args.quick else args.steps
    runs = [tuple(pair.split(":", 1)) for pair in args.only] if args.only else RUNS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_images(Path(tmp))
        for design, allocator in runs:
            row = run_one(design, allocator, manifest, steps)
            rows.append(row)
            if "skipped" in row:
                print(f"{design:<12} {allocator:<9} skipped: {row['skipped']}", flush=True)
                continue
            print(f"{design:<12} {allocator:<9} {row['images_per_s']:7.1f} images/s  "
                  f"{row['kernel_s_per_step']:6.2f} s kernel/step  "
                  f"{row['cuhk03_epoch_min']:5.2f} min/CUHK03 epoch", flush=True)
    base = next(r for r in rows if "skipped" not in r)
    print("\n| design | allocator | input | batch | images/s | kernel s/step | "
          f"min per CUHK03 epoch | vs {base['design']}, {base['allocator']} |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            continue
        h, w = r["input_size"]
        print(f"| {r['design']} | {r['allocator']} | {h}x{w} | {r['batch']} | "
              f"{r['images_per_s']:.1f} | {r['kernel_s_per_step']:.2f} | "
              f"{r['cuhk03_epoch_min']:.2f} | {r['images_per_s'] / base['images_per_s']:.2f}x |")
    write_results(args.out, {"machine": machine_info(), "steps": steps, "rows": rows},
                  note="images/s of Trainer.step after 2 warm-up steps, generated images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
