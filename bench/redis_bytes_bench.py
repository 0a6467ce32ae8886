"""Redis bytes per gallery item: what the service stored before issue 20 against what it stores
now, the same images written both ways into one Redis in one run.

``--images`` real CUHK03 ``train`` images (``$DSMI_DATA``, default ``../shared/data``) go
through the upload path's own functions (``service.matching.read_image`` with the thumbnail,
``gallery_blobs``, the store's ``add_items`` 32 at a time, as one upload request) with the
bundled model (or ``--model-dir``), once per design, each into a Redis key prefix of its own
(deleted afterwards):

- ``before``: the gallery fields in float32 and each item's conv5 map (float32, never read back)
  and the thumbnail: the service until issue 20;
- ``float32, no map``: the conv5 map dropped, float32 kept (``DSMI_CACHE_DTYPE=float32``);
- ``now``: the gallery fields in float16 (the default since) and the thumbnail.

Per item: the bytes of its blobs and description (the payload), every key the store wrote
under the prefix summed by ``MEMORY USAGE`` (the item hashes and the gallery's index,
generation and change log), and ``INFO memory``'s ``used_memory`` growth (the allocator's view;
noisier where others use the same Redis), each divided by the images.

``--ranking`` people (default 100; 0 skips): CUHK03 ``val``, each person's first camera-1
image as the gallery and first camera-2 image as the probe, scored against the float32 and the
float16 gallery fields: the largest score difference and how often the top 10 and the whole
order agree (the evidence that float16 is a safe default).

    .venv/bin/python -m bench.redis_bytes_bench          # bench/results/redis-bytes.json
    .venv/bin/python -m bench.redis_bytes_bench --images 64 --ranking 0
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import numpy as np

from bench.common import machine_info, write_results
from bench.gallery_bench import DATA, real_images
from service.engine import Engine
from service.matching import ENCODE_BATCH, gallery_blobs, read_image
from service.settings import DEFAULT_MODEL_DIR
from service.store import GalleryItem, NewItem, RedisGalleryStore, new_image_id
from service.thumbnails import THUMBNAIL_FIELD

ROOT = Path(__file__).resolve().parents[1]
UPLOAD = 32  # images per upload request, as the console and bench.model_bench send them
BEFORE_MAPS_FIELD = "maps"  # the conv5 map's blob field before issue 20


def before_blobs(engine: Engine, tensors: list[np.ndarray]) -> list[dict[str, bytes]]:
    """The upload path's blobs as they were before issue 20: the engine's gallery fields and
    the conv5 map, raw little-endian ``cache_dtype`` each (the codec's byte format)."""
    stored = np.dtype(engine.cache_dtype).newbyteorder("<")
    blobs = []
    for start in range(0, len(tensors), ENCODE_BATCH):
        maps = engine.encode(np.stack(tensors[start:start + ENCODE_BATCH]), stream="b")
        prepared = engine.prepare_gallery(maps)
        for k in range(len(maps)):
            item = engine.codec.encode({f: a[k] for f, a in prepared.items()})
            item[BEFORE_MAPS_FIELD] = np.ascontiguousarray(maps[k], stored).tobytes()
            blobs.append(item)
    return blobs


def prefix_bytes(client, prefix: str) -> tuple[int, int]:
    """(keys under ``prefix``, their ``MEMORY USAGE`` summed, every element counted)."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return len(keys), sum(int(n or 0) for n in pipe.execute())


def delete_prefix(client, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for k in range(0, len(keys), 1000):
        client.delete(*keys[k:k + 1000])


def store_design(engine: Engine, redis_url: str, decoded, uploads, blobs) -> dict:
    """Write the images' ``blobs`` (and thumbnails) under a fresh prefix; bytes per item."""
    import redis

    client = redis.Redis.from_url(redis_url)
    prefix = f"dsmi-bench-{uuid.uuid4().hex[:8]}:"
    store = RedisGalleryStore(redis_url, namespace=engine.cache_namespace, prefix=prefix)
    n = len(decoded)
    payload = 0
    try:
        before = client.info("memory")["used_memory"]
        for start in range(0, n, UPLOAD):
            batch = []
            for k in range(start, min(n, start + UPLOAD)):
                item_blobs = {**blobs[k], THUMBNAIL_FIELD: decoded[k].thumbnail}
                _, person, camera = uploads[k]
                item = GalleryItem(new_image_id(), person, camera, width=decoded[k].width,
                                   height=decoded[k].height, filename=f"{k}.jpg")
                payload += sum(len(b) for b in item_blobs.values()) + len(item.to_json())
                batch.append(NewItem(item, item_blobs))
            store.add_items("bench", batch)
        grown = client.info("memory")["used_memory"] - before
        keys, usage = prefix_bytes(client, prefix)
    finally:
        store.close()
        delete_prefix(client, prefix)
    fields = {f: len(v) for f, v in blobs[0].items()}
    fields[THUMBNAIL_FIELD] = round(float(np.mean([len(d.thumbnail) for d in decoded])), 1)
    return {"cache_dtype": engine.cache_dtype, "blob_bytes": fields, "keys": keys,
            "payload_bytes_per_item": payload / n, "memory_usage_bytes_per_item": usage / n,
            "used_memory_growth_per_item": grown / n}


def float16_ranking(f32: Engine, f16: Engine, people: int) -> dict:
    """CUHK03 val: camera-1 gallery, camera-2 probes, float32 vs float16 gallery fields."""
    from training.data import by_split, read_manifest

    records = by_split(read_manifest(DATA / "cuhk03-labeled.csv"), "val")
    first: dict[int, dict] = {1: {}, 2: {}}
    for r in sorted(records, key=lambda r: str(r.path)):
        if r.camid in first:
            first[r.camid].setdefault(r.pid, r)
    chosen = sorted(set(first[1]) & set(first[2]))[:people]
    maps = f32.encode(np.stack([f32.preprocess(first[1][p].path) for p in chosen]), "b")
    g32, g16 = f32.prepare_gallery(maps), f16.prepare_gallery(maps)
    worst, top10, whole = 0.0, 0, 0
    for p in chosen:
        probe = f32.prepare_probe(f32.encode(f32.preprocess(first[2][p].path)[None], "a"))
        s32, s16 = f32.score(probe, g32), f16.score(probe, g16)
        worst = max(worst, float(np.abs(s32 - s16).max()))
        o32, o16 = np.argsort(-s32, kind="stable"), np.argsort(-s16, kind="stable")
        top10 += bool((o32[:10] == o16[:10]).all())
        whole += bool((o32 == o16).all())
    return {"people": len(chosen), "max_abs_score_difference": worst,
            "top10_identical": top10, "whole_order_identical": whole}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--images", type=int, default=512, help="images written per design")
    p.add_argument("--ranking", type=int, default=100,
                   help="CUHK03 val people for the float16 ranking check (0: skip)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "redis-bytes.json")
    args = p.parse_args(argv)
    f32 = Engine(args.model_dir, providers=["cpu"], cache_dtype="float32")
    f16 = Engine(args.model_dir, providers=["cpu"], cache_dtype="float16")
    uploads = real_images(args.images, "train")
    decoded = [read_image(data, f32, 10 * 2**20, 16_000_000, thumbnail=True)
               for data, _, _ in uploads]
    tensors = [d.tensor for d in decoded]
    designs = {
        "before": (f32, lambda: before_blobs(f32, tensors)),
        "float32, no map": (f32, lambda: gallery_blobs(f32, tensors)),
        "now": (f16, lambda: gallery_blobs(f16, tensors)),
    }
    rows = {}
    for name, (engine, make) in designs.items():
        rows[name] = store_design(engine, args.redis_url, decoded, uploads, make())
        r = rows[name]
        print(f"{name:<16} {r['cache_dtype']:<8} payload {r['payload_bytes_per_item'] / 1024:6.1f}"
              f" KiB  MEMORY USAGE {r['memory_usage_bytes_per_item'] / 1024:6.1f} KiB  "
              f"used_memory {r['used_memory_growth_per_item'] / 1024:6.1f} KiB per item",
              flush=True)
    base = rows["before"]["memory_usage_bytes_per_item"]
    print(f"\n{args.images} CUHK03 images, model {f32.variant} ({f32.model_id})\n")
    print("| design | cache dtype | blobs per item | payload KiB | Redis KiB (MEMORY USAGE) | "
          "used_memory growth KiB | vs before |\n|---|---|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['cache_dtype']} | {', '.join(r['blob_bytes'])} | "
              f"{r['payload_bytes_per_item'] / 1024:.1f} | "
              f"{r['memory_usage_bytes_per_item'] / 1024:.1f} | "
              f"{r['used_memory_growth_per_item'] / 1024:.1f} | "
              f"{r['memory_usage_bytes_per_item'] / base:.3f} |")
    result = {"machine": machine_info(), "model_dir": str(args.model_dir),
              "model_id": f32.model_id, "variant": f32.variant, "images": args.images,
              "upload_batch": UPLOAD, "designs": rows}
    if args.ranking:
        result["float16_ranking"] = ranking = float16_ranking(f32, f16, args.ranking)
        print(f"\nfloat16 vs float32 gallery fields, {ranking['people']} CUHK03 val people: "
              f"max |score difference| {ranking['max_abs_score_difference']:.2e}, top 10 "
              f"identical for {ranking['top10_identical']}, whole order for "
              f"{ranking['whole_order_identical']}")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
