"""Query latency for large galleries: resident two-stage and exhaustive against today's
streaming design, in one run.

Galleries of ``--sizes`` items (default 10,000 and 100,000) are written into Redis on a key
prefix of their own (deleted afterwards), in the service's cache format (the gallery fields;
the conv5 map is no longer stored). Their tensors are real: ``--real`` CUHK03 ``train`` images
(``$DSMI_DATA``, default ``../shared/data``) through the model's gallery side, each gallery
item one of them with a little noise added to its cached fields, so that no two items are
equal. Probes: CUHK03 ``val`` images. Queries go through the real app in-process (FastAPI's
TestClient: multipart encoding and parsing included, no network), as in service_bench.py:

- ``two-stage``: the service's default (resident gallery, embedding shortlist, the pair head
  re-scores ``--rerank`` items, default: the service's DSMI_RERANK);
- ``exhaustive``: resident gallery, the pair head scores every item (``rerank=0``);
- ``streamed``: no resident cache (DSMI_CACHE_MAX_BYTES=0): every query streams the gallery
  out of Redis and scores every item;
- ``before``: the service as issue 11 measured it: streamed, with the bundled model's
  channels-first head of commit ``bench.common.BEFORE_COMMIT`` (taken out of git, or
  ``--before-model-dir``), chunks of 256 scored one at a time on ONNX Runtime's spinning
  threads (``bench.common.before_engine``).
  Same weights, same scores.

Reported per size: p50/p95 of each design, the first query's load time (the gallery read from
Redis into the process), a write's replay time (one image uploaded through the route, then the
next query), Redis memory per item (INFO used_memory) and process memory per item (RSS).

``--million N`` (default 1,000,000; 0 skips): a resident gallery of N items in this process
(no Redis: N items of real tensors do not fit its memory here), stage one on synthetic
embeddings and stage two on real tensors (the pool of real items tiled), in
``--million-dtype`` (float16 by default, DSMI_CACHE_DTYPE): stage one, stage two and total
p50/p95 of ``service.ranking.GalleryRanker.rank_view``, what the query route's ranker calls.

    .venv/bin/python -m bench.gallery_bench                       # 10k, 100k, 1M
    .venv/bin/python -m bench.gallery_bench --sizes 10000 --million 0 --queries 10

Prints a table and writes ``bench/results/gallery.json``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import (  # noqa: E402
    BEFORE_COMMIT,
    before_engine,
    machine_info,
    tile_gallery,
    write_results,
)
from service.app import create_app, store_namespace  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.metrics import ServiceMetrics  # noqa: E402
from service.ranking import CameraFilter, GalleryRanker  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR, Settings  # noqa: E402
from service.store import (  # noqa: E402
    GalleryItem,
    MemoryGalleryStore,
    NewItem,
    RedisGalleryStore,
    new_image_id,
)
from service.store.resident import ResidentGallery  # noqa: E402

DATA = Path(os.environ.get("DSMI_DATA", ROOT.parent / "shared" / "data"))
WRITE_CHUNK = 500


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000],
                   help="gallery sizes written to Redis and queried through the service")
    p.add_argument("--queries", type=int, default=30, help="timed two-stage queries per size")
    p.add_argument("--exhaustive-queries", type=int, default=5,
                   help="timed exhaustive queries (resident and streamed) per size")
    p.add_argument("--streamed-max", type=int, default=100_000,
                   help="largest size at which the streamed design is timed")
    p.add_argument("--warmup", type=int, default=2, help="untimed queries per design")
    p.add_argument("--rerank", type=int, default=None,
                   help="two-stage shortlist (default: the service's DSMI_RERANK)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--real", type=int, default=1000, help="real CUHK03 images encoded")
    p.add_argument("--million", type=int, default=1_000_000,
                   help="in-process resident gallery size (0: skip)")
    p.add_argument("--million-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--million-queries", type=int, default=20)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--before-model-dir", type=Path, default=None,
                   help="model folder of the 'before' design (default: the bundled model of "
                        "commit BEFORE_COMMIT, from git)")
    p.add_argument("--no-before", action="store_true", help="skip the 'before' design")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gallery.json")
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def real_images(count: int, split: str) -> list[tuple[bytes, str, str]]:
    manifest = DATA / "cuhk03-labeled.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: set DSMI_DATA to the shared data folder")
    with manifest.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split][:count]
    return [((DATA / r["path"]).read_bytes(), r["pid"], r["camid"]) for r in rows]


def real_pool(engine: Engine, count: int) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
    """Real CUHK03 train images -> (prepared gallery fields, conv5 maps, their labels)."""
    images = real_images(count, "train")
    tensors = np.stack([engine.preprocess(data) for data, _, _ in
                        tqdm(images, desc="decode", unit="img", leave=False)])
    maps = engine.encode(tensors, "b")
    return engine.prepare_gallery(maps), maps, [(p, c) for _, p, c in images]


def fill_redis(engine: Engine, store: RedisGalleryStore, gallery: str, size: int, pool,
               maps: np.ndarray, labels) -> None:
    with tqdm(total=size, desc=f"write {size:,} items to Redis", unit="item") as bar:
        for start in range(0, size, WRITE_CHUNK):
            rows = np.arange(start, min(size, start + WRITE_CHUNK))
            tensors = tile_gallery({f: a[rows % len(maps)] for f, a in pool.items()},
                                   len(rows), seed=start)
            batch = []
            for j, k in enumerate(rows):
                blobs = engine.codec.encode({f: a[j] for f, a in tensors.items()})
                person, camera = labels[k % len(labels)]
                batch.append(NewItem(GalleryItem(new_image_id(), person, camera,
                                                 filename=f"{k}.jpg"), blobs))
            store.add_items(gallery, batch)
            bar.update(len(batch))


def timed_queries(client: TestClient, probes: list[bytes], n: int, warmup: int,
                  **fields) -> tuple[list[float], list[dict]]:
    wall, bodies = [], []
    for k in range(warmup + n):
        t0 = time.perf_counter()
        r = client.post("/v1/galleries/bench/query",
                        files={"image": ("probe.jpg", probes[k % len(probes)])},
                        data={k_: str(v) for k_, v in fields.items()})
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        if k >= warmup:
            wall.append(1e3 * elapsed)
            bodies.append(r.json())
    return wall, bodies


def summary(wall: list[float], bodies: list[dict]) -> dict:
    def mean(key: str) -> float:
        return statistics.mean(b["timings"][key] for b in bodies)

    return {"queries": len(wall), "p50_ms": pct(wall, 50), "p95_ms": pct(wall, 95),
            "mean_fetch_ms": mean("fetch_ms"), "mean_score_ms": mean("score_ms"),
            "mean_shortlist_ms": mean("shortlist_ms"), "mean_encode_ms": mean("encode_ms"),
            "resident": bodies[0]["resident"], "rescored": bodies[0]["rescored"]}


def bench_size(engine: Engine, args, size: int, pool, maps, labels, probes,
               before: Engine | None) -> dict:
    import redis

    prefix = f"dsmi-bench-{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(args.redis_url)
    store = RedisGalleryStore(args.redis_url, namespace=store_namespace(engine), prefix=prefix,
                              socket_timeout=60)
    row: dict = {"gallery_size": size}
    try:
        used0 = client.info("memory")["used_memory"]
        t0 = time.perf_counter()
        fill_redis(engine, store, "bench", size, pool, maps, labels)
        row["write_s"] = time.perf_counter() - t0
        row["redis_bytes_per_item"] = (client.info("memory")["used_memory"] - used0) / size
        cached = dict(score_batch=engine.batch_size)
        if args.rerank is not None:
            cached["rerank"] = args.rerank
        resident_app = create_app(Settings(**cached, cache_max_bytes=1 << 40), engine=engine,
                                  store=store)
        with TestClient(resident_app) as c:
            rss0 = rss_bytes()
            t0 = time.perf_counter()
            timed_queries(c, probes, 1, 0, top_k=args.top_k)
            row["load_s"] = time.perf_counter() - t0
            row["process_bytes_per_item"] = (rss_bytes() - rss0) / size
            row["two_stage"] = summary(*timed_queries(c, probes, args.queries, args.warmup,
                                                      top_k=args.top_k))
            row["exhaustive"] = summary(*timed_queries(c, probes, args.exhaustive_queries, 1,
                                                       top_k=args.top_k, rerank=0))
            # A write through the route, then the next query: it replays the change.
            r = c.post("/v1/galleries/bench/images",
                       files=[("images", ("new.jpg", probes[0]))],
                       data={"person_id": "new", "camera_id": "1"})
            r.raise_for_status()
            wall, bodies = timed_queries(c, probes, 1, 0, top_k=args.top_k)
            row["after_write"] = {"query_ms": wall[0],
                                  "fetch_ms": bodies[0]["timings"]["fetch_ms"],
                                  "gallery_size": bodies[0]["gallery_size"]}
            row["rerank"] = row["two_stage"]["rescored"]
        del resident_app
        if size <= args.streamed_max:
            streamed_app = create_app(Settings(**cached, cache_max_bytes=0), engine=engine,
                                      store=store)
            with TestClient(streamed_app) as c:
                row["streamed"] = summary(*timed_queries(
                    c, probes, args.exhaustive_queries, 1, top_k=args.top_k, rerank=0))
            if before is not None:
                before_app = create_app(Settings(**cached, cache_max_bytes=0), engine=before,
                                        store=store)
                with TestClient(before_app) as c:
                    row["before"] = summary(*timed_queries(
                        c, probes, args.exhaustive_queries, 1, top_k=args.top_k, rerank=0))
    finally:
        store.clear()
        store.close()
        client.close()
    return row


def bench_million(engine: Engine, args, pool, probes) -> dict:
    """A resident gallery of ``args.million`` items in this process: synthetic embeddings
    (stage one), real cached tensors tiled (stage two)."""
    from service.store.codec import TensorCodec

    n = args.million
    codec = TensorCodec(engine.codec.spec, args.million_dtype, required=engine.gallery_fields)
    resident = ResidentGallery("million", codec, "embedding")
    rng = np.random.default_rng(0)
    pool_n = len(pool["embedding"])
    chunk = 50_000
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    for start in tqdm(range(0, n, chunk), desc=f"build {n:,} resident items", unit="chunk"):
        count = min(chunk, n - start)
        rows = (start + np.arange(count)) % pool_n
        batch = {f: a[rows].astype(args.million_dtype) for f, a in pool.items()}
        batch["embedding"] = rng.standard_normal((count, batch["embedding"].shape[1])).astype(
            args.million_dtype)
        items = [GalleryItem(new_image_id(), f"s{start + k}", "1") for k in range(count)]
        resident.append(items, batch)
    build_s = time.perf_counter() - t0
    view = resident.view()
    ranker = GalleryRanker(engine, MemoryGalleryStore(), ServiceMetrics())
    rerank = args.rerank if args.rerank is not None else Settings().rerank
    stage1, total = [], []
    for k in range(2 + args.million_queries):
        probe = ranker.encode_probe(engine.preprocess(probes[k % len(probes)]))
        t0 = time.perf_counter()
        out = ranker.rank_view(view, probe, args.top_k, CameraFilter(), rerank)
        elapsed = time.perf_counter() - t0
        if k >= 2:
            total.append(1e3 * elapsed)
            stage1.append(1e3 * out.shortlist_s)
    stage2 = [t - s for t, s in zip(total, stage1, strict=True)]
    return {"gallery_size": n, "dtype": args.million_dtype, "rerank": rerank,
            "build_s": build_s, "process_bytes_per_item": (rss_bytes() - rss0) / n,
            "resident_bytes_per_item": resident.nbytes / n,
            "queries": len(total), "p50_ms": pct(total, 50), "p95_ms": pct(total, 95),
            "stage_one_p50_ms": pct(stage1, 50), "stage_two_p50_ms": pct(stage2, 50)}


def print_table(result: dict) -> None:
    print(f"model {result['model']['variant']} ({result['model']['model_id']}), "
          f"{', '.join(result['model']['providers'])}, top_k {result['top_k']}, "
          f"load average {result['machine']['load_average'][0]:.2f} -> "
          f"{result['load_average_end'][0]:.2f} on {result['machine']['cpus_usable']} CPUs")
    print(f"{'gallery':>9} {'design':>11} {'rerank':>7} {'p50 ms':>9} {'p95 ms':>9} "
          f"{'fetch':>8} {'score':>8}  notes")
    for r in result["redis"]:
        for design in ("two_stage", "exhaustive", "streamed", "before"):
            d = r.get(design)
            if d is None:
                continue
            note = ""
            if design == "two_stage":
                after = r["after_write"]["query_ms"]
                redis_kib = r["redis_bytes_per_item"] / 1024
                process_kib = r["process_bytes_per_item"] / 1024
                note = (f"load {r['load_s']:.1f} s; after a write {after:.0f} ms; Redis "
                        f"{redis_kib:.1f} KiB/item, process {process_kib:.1f} KiB/item")
            elif design in ("exhaustive", "streamed") and "before" in r:
                note = f"{r['before']['p50_ms'] / d['p50_ms']:.1f}x faster than before"
            print(f"{r['gallery_size']:>9,} {design:>11} {d['rescored']:>7} {d['p50_ms']:>9.1f} "
                  f"{d['p95_ms']:>9.1f} {d['mean_fetch_ms']:>8.1f} {d['mean_score_ms']:>8.1f}"
                  f"  {note}")
    m = result.get("million")
    if m:
        print(f"{m['gallery_size']:>9,} {'in-process':>11} {m['rerank']:>7} {m['p50_ms']:>9.1f} "
              f"{m['p95_ms']:>9.1f} {'':>8} {'':>8}  stage one p50 {m['stage_one_p50_ms']:.1f}"
              f" ms, stage two {m['stage_two_p50_ms']:.1f} ms; {m['dtype']}, "
              f"{m['resident_bytes_per_item']:.0f} B/item resident")
    print("p50/p95: wall time per query request (in-process app, real Redis); fetch/score: "
          "mean server-side stage times; rerank column: items the pair head scored")


def main(argv=None) -> int:
    args = parse_args(argv)
    engine = Engine(args.model_dir, providers=["cpu"])
    # The 'before' design is the same model with its old head: only for dsmi-small.
    same_model = args.before_model_dir is not None or engine.variant == "dsmi-small"
    before = (before_engine(engine.model_id, args.before_model_dir)
              if same_model and not args.no_before else None)
    machine = machine_info()
    pool, maps, labels = real_pool(engine, args.real)
    probes = [data for data, _, _ in real_images(50, "val")]
    result = {"command": "python -m bench.gallery_bench " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "model": {"variant": engine.variant, "model_id": engine.model_id,
                        "providers": engine.providers, "cache_dtype": engine.cache_dtype},
              "top_k": args.top_k, "real_images": len(labels), "machine": machine,
              "head_threads": engine.head_threads,
              "before": None if before is None else {"commit": BEFORE_COMMIT,
                                                     "model_dir": str(before.model_dir)},
              "redis": []}
    for size in args.sizes:
        result["redis"].append(bench_size(engine, args, size, pool, maps, labels, probes,
                                          before))
    if args.million:
        result["million"] = bench_million(engine, args, pool, probes)
    result["load_average_end"] = list(os.getloadavg())
    print_table(result)
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
