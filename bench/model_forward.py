"""Parameter counts of every variant and the CPU time of one forward pass on an image pair.

    .venv/bin/python -m bench.model_forward                  # every variant, 5 repeats
    .venv/bin/python -m bench.model_forward --variants dsmi dsmi-small --repeats 10

One forward pass on a pair = both images through the trunk(s), both per-image sides, and the
pair head (``net(images_a, images_b)``), in eval mode, float32, at the variant's input size.
Prints a table and writes ``bench/results/model-forward.json`` (median, min and every sample).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from model import build_model, list_variants


def forward_time(name: str, repeats: int, threads: int) -> dict:
    torch.manual_seed(0)
    net = build_model(name, weights=None).eval()  # random weights time the same
    h, w = net.input_size
    a, b = torch.randn(1, 3, h, w), torch.randn(1, 3, h, w)
    samples = []
    with torch.no_grad():
        net(a, b)  # warm-up: allocator, oneDNN primitives
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(a, b)
            samples.append(time.perf_counter() - t0)
    return {"variant": name, "input_size": list(net.input_size),
            "parameters": sum(p.numel() for p in net.parameters()),
            "median_ms": 1000 * statistics.median(samples), "min_ms": 1000 * min(samples),
            "samples_ms": [1000 * s for s in samples], "threads": threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list_variants())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="bench/results/model-forward.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [forward_time(name, args.repeats, args.threads) for name in args.variants]
    print(f"{'variant':<22} {'input':>8} {'parameters':>12} {'median ms':>10} {'min ms':>8}")
    for r in rows:
        size = "x".join(map(str, r["input_size"]))
        print(f"{r['variant']:<22} {size:>8} {r['parameters']:>12,} {r['median_ms']:>10.1f} "
              f"{r['min_ms']:>8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_average": os.getloadavg(), "torch": torch.__version__,
               "threads": args.threads}
    out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
    print(f"wrote {out} (load average {machine['load_average'][0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
