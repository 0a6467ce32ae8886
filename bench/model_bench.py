"""The bundled model against the one it replaced, in one run: what a heavier trunk costs the
service on this machine.

For each model: uploads through the real app in-process (memory store; batches of 32 real
CUHK03 ``train`` images, multipart parsing, decoding, the trunk, the gallery side and the
thumbnails included) in images per second, and two-stage queries of a 10,000-item resident
gallery in Redis (the service's defaults; items are real images' tensors tiled with a little
noise, as in ``bench.gallery_bench``), p50 and p95 wall time per query, with the bytes Redis
holds per item.

    .venv/bin/python -m bench.model_bench                 # bench/results/model.json
    .venv/bin/python -m bench.model_bench --size 2000 --queries 10

``--before-model-dir`` / ``--model-dir`` name the two folders; by default the model bundled at
commit ``bench.common.SMALL_MODEL_COMMIT`` (taken out of git) and today's
``service/default_model``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from bench.common import machine_info, small_model_dir, write_results
from bench.gallery_bench import (
    fill_redis,
    real_images,
    real_pool,
    summary,
    timed_queries,
)
from service.app import create_app, store_namespace
from service.engine import Engine
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.store import RedisGalleryStore

ROOT = Path(__file__).resolve().parents[1]


def upload_rate(engine: Engine, images: list[tuple[bytes, str, str]], batch: int = 32,
                warmup: int = 1) -> dict:
    app = create_app(Settings(), engine=engine, store=None)
    timings = []
    with TestClient(app) as client:
        chunks = [images[k:k + batch] for k in range(0, len(images), batch)]
        for n, chunk in enumerate(chunks):
            files = [("images", (f"{k}.jpg", data)) for k, (data, _, _) in enumerate(chunk)]
            fields = {"person_id": [p for _, p, _ in chunk], "camera_id": [c for _, _, c in chunk]}
            started = time.perf_counter()
            r = client.post("/v1/galleries/upload-bench/images", files=files, data=fields)
            elapsed = time.perf_counter() - started
            r.raise_for_status()
            if n >= warmup:
                timings.append((len(chunk), elapsed))
    count = sum(n for n, _ in timings)
    return {"images": count, "batch": batch, "images_per_s": count / sum(t for _, t in timings)}


def query_latency(engine: Engine, args, probes: list[bytes]) -> dict:
    import redis

    prefix = f"dsmi-bench-{uuid.uuid4().hex[:8]}:"
    store = RedisGalleryStore(args.redis_url, namespace=store_namespace(engine), prefix=prefix)
    client_redis = redis.Redis.from_url(args.redis_url)
    try:
        before = client_redis.info("memory")["used_memory"]
        pool, maps, labels = real_pool(engine, args.real)
        fill_redis(engine, store, "bench", args.size, pool, maps, labels)
        per_item = (client_redis.info("memory")["used_memory"] - before) / args.size
        app = create_app(Settings(), engine=engine, store=store)
        with TestClient(app) as client:
            wall, bodies = timed_queries(client, probes, args.queries, args.warmup,
                                         top_k=10)
        return {**summary(wall, bodies), "size": args.size, "redis_bytes_per_item": per_item}
    finally:
        keys = list(client_redis.scan_iter(f"{prefix}*", count=1000))
        for k in range(0, len(keys), 1000):
            client_redis.delete(*keys[k:k + 1000])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--before-model-dir", type=Path, default=None)
    p.add_argument("--size", type=int, default=10_000, help="items in the queried gallery")
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--uploads", type=int, default=256, help="images uploaded (timed)")
    p.add_argument("--real", type=int, default=500, help="real images tiled into the gallery")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model.json")
    args = p.parse_args(argv)
    models = {"before": small_model_dir(args.before_model_dir),
              "now": args.model_dir}
    uploads = real_images(args.uploads + 32, "train")
    probes = [data for data, _, _ in real_images(args.queries + args.warmup, "val")]
    rows = {}
    for name, folder in models.items():
        engine = Engine(folder, providers=["cpu"])
        row = {"model_dir": str(folder), "model_id": engine.model_id, "variant": engine.variant,
               "input_size": list(engine.input_size), "map_shape": list(engine.map_shape)}
        row["upload"] = upload_rate(engine, uploads)
        row["query"] = query_latency(engine, args, probes)
        rows[name] = row
        print(f"{name:<7} {engine.variant:<20} upload {row['upload']['images_per_s']:6.1f} "
              f"images/s   {args.size:,}-item two-stage query p50 {row['query']['p50_ms']:6.1f} "
              f"ms p95 {row['query']['p95_ms']:6.1f} ms   Redis "
              f"{row['query']['redis_bytes_per_item'] / 1024:5.1f} KiB/item", flush=True)
    print("\n| model | variant | input | uploads, images/s | query p50 ms | query p95 ms | "
          "Redis KiB per item |\n|---|---|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        h, w = row["input_size"]
        q = row["query"]
        print(f"| {name} | {row['variant']} | {h}x{w} | {row['upload']['images_per_s']:.1f} | "
              f"{q['p50_ms']:.1f} | {q['p95_ms']:.1f} | {q['redis_bytes_per_item'] / 1024:.1f} |")
    write_results(args.out, {"machine": machine_info(), "size": args.size, "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
