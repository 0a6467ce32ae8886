"""Query latency of the matching service for galleries of several sizes.

The real app in-process (FastAPI's TestClient: multipart encoding and parsing included, no
network), the gallery cache in Redis on a key prefix of its own (deleted afterwards). Gallery
images: CUHK03 ``train`` images from the shared data when present, else random images; probes:
CUHK03 ``val`` images (or other random images). Prints a table and writes JSON.

    .venv/bin/python bench/service_bench.py                  # galleries of 100 and 1,000
    .venv/bin/python bench/service_bench.py --sizes 100 --queries 20 --model-dir DIR

Without ``--model-dir``: the bundled ``service/default_model`` when it exists, else a randomly
initialised ``dsmi-small`` exported to a temporary folder (needs PyTorch; the latency of a
random model equals that of a trained one of the same variant).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import write_results  # noqa: E402
from service.app import create_app, store_namespace  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR, Settings  # noqa: E402
from service.store import RedisGalleryStore  # noqa: E402

DATA = Path(os.environ.get("DSMI_DATA", ROOT.parent / "shared" / "data"))
UPLOAD_CHUNK = 50


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--queries", type=int, default=40, help="timed queries per size")
    p.add_argument("--warmup", type=int, default=3, help="untimed queries first")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--score-batch", type=int, default=256)
    p.add_argument("--providers", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    return p.parse_args(argv)


def model_dir(args, cleanup: list[Path]) -> Path:
    if args.model_dir:
        return args.model_dir
    if (DEFAULT_MODEL_DIR / "manifest.json").is_file():
        return DEFAULT_MODEL_DIR
    import torch

    from model import build_model
    from model.export import export_model

    tmp = Path(tempfile.mkdtemp(prefix="dsmi-bench-"))
    cleanup.append(tmp)
    torch.manual_seed(0)
    export_model(build_model("dsmi-small"), tmp / "dsmi-small")
    return tmp / "dsmi-small"


def random_jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (160, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_sources(n_gallery: int, n_probes: int) -> tuple[list[tuple], list[bytes], str]:
    """(gallery [(name, bytes, person, camera)], probes [bytes], where they come from)."""
    manifest = DATA / "cuhk03-labeled.csv"
    if manifest.is_file():
        import csv
        with manifest.open() as fh:
            rows = list(csv.DictReader(fh))
        train = [r for r in rows if r["split"] == "train"][:n_gallery]
        val = [r for r in rows if r["split"] == "val"][:n_probes]
        if len(train) == n_gallery and len(val) == n_probes:
            gallery = [(Path(r["path"]).name, (DATA / r["path"]).read_bytes(), r["pid"],
                        r["camid"]) for r in train]
            return gallery, [(DATA / r["path"]).read_bytes() for r in val], "CUHK03-labeled"
    gallery = [(f"{k}.jpg", random_jpeg(k), str(k), "1") for k in range(n_gallery)]
    return gallery, [random_jpeg(10**6 + k) for k in range(n_probes)], "random 64x160 JPEG"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_size(engine: Engine, args, size: int, gallery, probes) -> dict:
    import redis

    prefix = f"dsmi-bench-{uuid.uuid4().hex[:12]}:"
    store = RedisGalleryStore(args.redis_url, namespace=store_namespace(engine), prefix=prefix)
    app = create_app(Settings(score_batch=args.score_batch), engine=engine, store=store)
    try:
        with TestClient(app) as client:
            t0 = time.perf_counter()
            for start in range(0, size, UPLOAD_CHUNK):
                part = gallery[start:start + UPLOAD_CHUNK]
                r = client.post("/v1/galleries/bench/images",
                                files=[("images", (name, data)) for name, data, _, _ in part],
                                data={"person_id": [p for _, _, p, _ in part],
                                      "camera_id": [c for _, _, _, c in part]})
                r.raise_for_status()
            upload_s = time.perf_counter() - t0
            wall, server = [], []
            for k in range(args.warmup + args.queries):
                probe = probes[k % len(probes)]
                t0 = time.perf_counter()
                r = client.post("/v1/galleries/bench/query",
                                files={"image": ("probe.jpg", probe)},
                                data={"top_k": str(args.top_k)})
                elapsed = time.perf_counter() - t0
                r.raise_for_status()
                body = r.json()
                assert body["scored"] == size, body["scored"]
                if k >= args.warmup:
                    wall.append(1e3 * elapsed)
                    server.append(body["timings"])
    finally:
        client_ = redis.Redis.from_url(args.redis_url)
        keys = list(client_.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client_.delete(*keys)
        client_.close()
        store.close()
    stage = {key: statistics.mean(t[key] for t in server)
             for key in ("encode_ms", "fetch_ms", "score_ms", "total_ms")}
    return {"gallery_size": size, "queries": args.queries,
            "p50_ms": percentile(wall, 50), "p95_ms": percentile(wall, 95),
            "server_p50_ms": percentile([t["total_ms"] for t in server], 50),
            "server_p95_ms": percentile([t["total_ms"] for t in server], 95),
            "mean_stage_ms": stage, "upload_s": upload_s,
            "upload_images_per_s": size / upload_s}


def main(argv=None) -> int:
    args = parse_args(argv)
    cleanup: list[Path] = []
    try:
        folder = model_dir(args, cleanup)
        engine = Engine(folder, providers=[args.providers], batch_size=args.score_batch)
        gallery, probes, source = image_sources(max(args.sizes), 50)
        load_before = os.getloadavg()
        rows = [bench_size(engine, args, size, gallery[:size], probes) for size in args.sizes]
        load_after = os.getloadavg()
    finally:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)

    print(f"model {engine.variant} ({engine.model_id}), {', '.join(engine.providers)}, "
          f"score batch {engine.batch_size}, cache {engine.cache_dtype}, Redis store, "
          f"images: {source}, top_k {args.top_k}")
    print(f"{'gallery':>8} {'queries':>8} {'p50 ms':>8} {'p95 ms':>8} {'encode':>8} "
          f"{'fetch':>8} {'score':>8} {'upload img/s':>13}")
    for r in rows:
        s = r["mean_stage_ms"]
        print(f"{r['gallery_size']:>8} {r['queries']:>8} {r['p50_ms']:>8.1f} "
              f"{r['p95_ms']:>8.1f} {s['encode_ms']:>8.1f} {s['fetch_ms']:>8.1f} "
              f"{s['score_ms']:>8.1f} {r['upload_images_per_s']:>13.1f}")
    print("p50/p95: wall time per query request, client side (in-process app, real Redis); "
          "encode/fetch/score: mean server-side stage times")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs")

    result = {
        "command": "python bench/service_bench.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
        "model": {"variant": engine.variant, "model_id": engine.model_id,
                  "dir": str(folder), "providers": engine.providers},
        "score_batch": engine.batch_size, "cache_dtype": engine.cache_dtype,
        "store": "redis", "images": source, "top_k": args.top_k,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "results": rows,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
