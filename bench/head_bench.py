"""The pair head on the CPU: the channels-first head of before against today's, in one run.

Both heads are the bundled model's (same weights, same scores): ``before`` is its head graph
as of commit ``bench.common.BEFORE_COMMIT`` (taken out of git, or ``--before-model-dir``),
today's is ``service/default_model``. Designs, each scoring one probe against ``--n`` prepared
gallery items of real CUHK03 images (tiled with 1% noise), interleaved run by run so that
the machine's other load falls on all of them alike:

- ``before``: the old graph, chunks of 256, one at a time on ONNX Runtime's spinning threads
  (the service as issue 11 measured it);
- ``serial``: today's graph, chunks of 128, one at a time on ONNX Runtime's threads;
- ``threads``: today's graph as the service runs it: chunks of 128, one per CPU side by side
  (``Engine(head_threads=None)``).

Also ONNX Runtime's own profile of each graph (one thread, 128 pairs per run): the share of
kernel time per operator type, which is what the channels-last rewrite was about.

    .venv/bin/python -m bench.head_bench                 # n = 10,000, 7 rounds
    .venv/bin/python -m bench.head_bench --n 2000 --rounds 3

Prints a table and writes ``bench/results/head.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BEFORE_COMMIT,
    before_engine,
    machine_info,
    small_model_dir,
    tile_gallery,
    write_results,
)
from bench.gallery_bench import real_images  # noqa: E402
from service.engine import Engine  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="gallery items per query")
    p.add_argument("--rounds", type=int, default=7, help="timed queries per design")
    p.add_argument("--real", type=int, default=500, help="real CUHK03 images encoded")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="dsmi-small with today's head (default: as bundled at commit "
                        "SMALL_MODEL_COMMIT, from git)")
    p.add_argument("--before-model-dir", type=Path, default=None,
                   help="model folder with the old head (default: the bundled model of "
                        "commit BEFORE_COMMIT, from git)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "head.json")
    return p.parse_args(argv)


def profile(model_dir: Path, probe: dict, gallery: dict, runs: int = 20) -> dict:
    """ONNX Runtime's profile of the head graph: kernel microseconds per run by operator."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "head")
    session = ort.InferenceSession(str(model_dir / "head.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    feed = {f"probe_{f}": v for f, v in probe.items()}
    feed.update({f"gallery_{f}": np.ascontiguousarray(v[:128], np.float32)
                 for f, v in gallery.items()})
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    return {"us_per_run": total / runs,
            "share": {op: us / total for op, us in by_op.most_common()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model_dir = small_model_dir(args.model_dir)
    today = Engine(args.model_dir, providers=["cpu"])
    engines = {"before": before_engine(today.model_id, args.before_model_dir),
               "serial": Engine(args.model_dir, providers=["cpu"], head_threads=1),
               "threads": today}
    images = real_images(args.real, "train")
    maps = today.encode(np.stack([today.preprocess(d) for d, _, _ in images]), "b")
    gallery = tile_gallery(today.prepare_gallery(maps), args.n)
    probe = today.prepare_probe(today.encode(today.preprocess(
        real_images(1, "val")[0][0])[None], "a"))
    scores = {name: e.score(probe, gallery) for name, e in engines.items()}  # warm-up too
    diff = max(float(np.abs(s - scores["threads"]).max()) for s in scores.values())
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.score(probe, gallery)
            times[name].append(time.perf_counter() - t0)
    rows = {}
    for name, t in times.items():
        median = statistics.median(t)
        rows[name] = {"median_ms": 1e3 * median, "best_ms": 1e3 * min(t),
                      "pairs_per_s": args.n / median, "samples_s": t,
                      "head_threads": engines[name].head_threads,
                      "head_batch_size": engines[name].head_batch_size}
    profiles = {"before": profile(engines["before"].model_dir, probe, gallery),
                "today": profile(today.model_dir, probe, gallery)}
    result = {"command": "python -m bench.head_bench " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "model_id": today.model_id, "n": args.n,
              "before_commit": BEFORE_COMMIT, "max_score_difference": diff,
              "designs": rows, "profiles": profiles}
    print(f"{args.n:,} pairs per query, {args.rounds} rounds, bundled model "
          f"{today.model_id}; max |score difference| between designs {diff:.2g}")
    print(f"{'design':>8} {'threads':>8} {'chunk':>6} {'median ms':>10} {'pairs/s':>9} "
          f"{'vs before':>10}")
    for name, r in rows.items():
        print(f"{name:>8} {r['head_threads']:>8} {r['head_batch_size']:>6} "
              f"{r['median_ms']:>10.1f} {r['pairs_per_s']:>9,.0f} "
              f"{rows['before']['median_ms'] / r['median_ms']:>9.2f}x")
    for name, p in profiles.items():
        top = ", ".join(f"{op} {100 * share:.0f}%" for op, share in
                        list(p["share"].items())[:6])
        print(f"profile {name}: {p['us_per_run'] / 1e3:.1f} ms per 128 pairs on one thread; {top}")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
