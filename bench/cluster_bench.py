"""Galleries on a Redis Cluster against one Redis: upload throughput, query latency and Redis
bytes per item, and a master killed under writers, in one run (issue 20, item 8).

The bundled model (or ``--model-dir``), ``--items`` items (default 100,000) in each of three
setups, one after the other (each setup's data is removed before the next):

- ``one Redis``: a fresh standalone redis-server (``tests.redis_cluster.LocalRedis``, so that
  ``used_memory`` holds nothing else), a gallery of 1 shard;
- ``cluster, 1 shard``: a Redis Cluster of 3 masters and 3 replicas
  (``tests.redis_cluster.LocalRedisCluster``, loopback ports), a gallery of 1 shard;
- ``cluster, 3 shards``: the same cluster, a gallery of 3 shards (the service's default in
  cluster mode).

Items are real: ``--pool`` CUHK03 ``train`` images (``$DSMI_DATA``, default ``../shared/data``)
go through the upload path's own functions once (``service.matching.read_image`` with the
thumbnail, ``gallery_blobs``): that pass is timed and reported as the engine's encode
images/s. Each stored item is one of them, its gallery fields with a little noise
(``bench.common.tile_gallery``, so that no two items tie), its real JPEG thumbnail, a fresh
image id (``new_image_id``, as the service gives) and the content digest of its image file.

Per setup:

- store upload images/s: ``add_items`` calls of ``--batch`` items (64), as one upload request
  makes, timed alone (the trunk's encoding is left out: it is the same for every setup; the
  items are built between calls, untimed); p50/p95 of one call; in cluster mode each call
  waits (``WAIT``) for 1 replica, the service's default there;
- HTTP upload images/s: ``--http-images`` real images (256) through
  ``POST /v1/galleries/{g}/images``, ``--http-batch`` (32) per request, in-process (FastAPI's
  TestClient): decoding, thumbnail, trunk and store together;
- queries: the service's default, resident two-stage (``bench.gallery_bench.timed_queries``
  through the app in-process): the first query's time (the gallery loaded from the store into
  the process), then p50/p95 of ``--queries`` (50) CUHK03 ``val`` probes;
- Redis bytes per item: the growth of ``INFO memory`` ``used_memory`` summed over the masters,
  divided by the items (and each master's share); for the cluster, the same over the replicas
  (after ``WAIT`` on every master): what each copy costs.

Then, on the cluster with the 3-shard gallery still in it, the failover: ``--writers`` (8)
threads upload ``--failover-batch`` (4) items at a time into another 3-shard gallery through
one store with the service's settings (1 s socket timeout, ``WAIT`` 1 replica within 1000 ms),
each with its own image ids, all of one batch on one shard (writer ``t`` on shard ``t % 3``),
retrying a failed call with the same ids on ``StoreUnavailable`` and ``WriteNotReplicated``.
The master of one of that gallery's shards (not the one holding the gallery's settings key) is
killed with SIGKILL; once its replica has taken over (``wait_for_failover``) it is restarted at
once, as a supervisor would (``heal()``: it comes back as a replica and syncs). Reported:
seconds from the kill until the replica was promoted, until the killed node was back in sync,
until a write to the killed master's slots was acknowledged again (the first one started after
the kill), the longest pause of the other shards' writes, the failed attempts by kind, and the
acknowledged writes lost: every image id whose ``add_items`` returned must be in the gallery
afterwards (read through a new client), and the 3-shard gallery must still hold ``--items``.

    .venv/bin/python -m bench.cluster_bench                 # 100,000 items, about 4 min
    .venv/bin/python -m bench.cluster_bench --items 2000    # a quick run

Prints a table and writes ``bench/results/cluster.json``. Needs redis-server and redis-cli
(6.0 or newer) on PATH; it never touches another Redis.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from bench.common import machine_info, tile_gallery, write_results  # noqa: E402
from bench.gallery_bench import (  # noqa: E402
    pct,
    real_images,
    rss_bytes,
    summary,
    timed_queries,
)
from service.app import create_app, load_engine, store_namespace  # noqa: E402
from service.domain import WriteNotReplicated  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.matching import ENCODE_BATCH, gallery_blobs, read_image  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR, Settings  # noqa: E402
from service.store import (  # noqa: E402
    GalleryItem,
    NewItem,
    RedisGalleryStore,
    StoreUnavailable,
    new_image_id,
)
from service.store.base import content_digest, shard_of  # noqa: E402
from service.store.redis_store import shard_tags  # noqa: E402
from service.thumbnails import THUMBNAIL_FIELD  # noqa: E402
from tests.redis_cluster import HOST, LocalRedis, LocalRedisCluster  # noqa: E402

GALLERY = "bench"              # bench.gallery_bench.timed_queries queries this gallery
HTTP_GALLERY = "bench-http"
FAILOVER_GALLERY = "failover"
FAILOVER_SHARDS = 3
WRITE_RETRIES = 50             # per add_items call while filling (same ids: idempotent)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--items", type=int, default=100_000, help="gallery items per setup")
    p.add_argument("--batch", type=int, default=64, help="items per add_items call")
    p.add_argument("--pool", type=int, default=300,
                   help="real CUHK03 train images encoded (the items are made from them)")
    p.add_argument("--http-images", type=int, default=256,
                   help="images uploaded through the HTTP route per setup (0: skip)")
    p.add_argument("--http-batch", type=int, default=32, help="images per HTTP upload")
    p.add_argument("--queries", type=int, default=50, help="timed queries per setup")
    p.add_argument("--warmup", type=int, default=2, help="untimed queries after the first")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--rerank", type=int, default=None,
                   help="two-stage shortlist (default: the service's DSMI_RERANK)")
    p.add_argument("--writers", type=int, default=8, help="writer threads in the failover")
    p.add_argument("--failover-batch", type=int, default=4, help="items per failover write")
    p.add_argument("--writer-pause", type=float, default=0.02,
                   help="seconds a writer waits after an acknowledged write")
    p.add_argument("--retry-pause", type=float, default=0.1,
                   help="seconds a writer waits before retrying a failed write")
    p.add_argument("--no-failover", action="store_true", help="skip the failover")
    p.add_argument("--socket-timeout", type=float, default=10.0,
                   help="Redis socket timeout of the fill and query store (the failover's "
                        "store keeps the service's 1 s)")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster.json")
    return p.parse_args(argv)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the real images ----------------------------------------------------------------------------

@dataclass
class Pool:
    """Real images through the upload path: what the stored items are made of."""

    arrays: dict[str, np.ndarray]   # prepared gallery fields, float32, (n, ...)
    blobs: list[dict[str, bytes]]   # each image's blobs as the upload route stores them
    thumbnails: list[bytes]
    labels: list[tuple[str, str]]
    sizes: list[tuple[int, int]]
    digests: list[str]
    encode: dict

    def __len__(self) -> int:
        return len(self.labels)


def build_pool(engine: Engine, settings: Settings, count: int) -> Pool:
    images = real_images(count, "train")
    warm = [engine.preprocess(data) for data, _, _ in images[:ENCODE_BATCH]]
    gallery_blobs(engine, warm)  # untimed: ONNX Runtime's first run of this batch shape
    t0 = time.perf_counter()
    decoded = [read_image(data, engine, settings.max_image_bytes, settings.max_pixels,
                          f"{k}.jpg", k, thumbnail=True,
                          max_decode_bytes=settings.max_decode_bytes)
               for k, (data, _, _) in enumerate(images)]
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    blobs = gallery_blobs(engine, [d.tensor for d in decoded])
    encode_s = time.perf_counter() - t0
    fields = engine.codec.decode(blobs)
    arrays = {f: np.asarray(a, dtype=np.float32) for f, a in fields.items()}
    for item_blobs, d in zip(blobs, decoded, strict=True):
        item_blobs[THUMBNAIL_FIELD] = d.thumbnail
    n = len(images)
    encode = {"images": n, "decode_thumbnail_s": decode_s, "trunk_side_codec_s": encode_s,
              "decode_thumbnail_images_per_s": n / decode_s,
              "trunk_side_codec_images_per_s": n / encode_s,
              "images_per_s": n / (decode_s + encode_s),
              "blob_bytes": {f: len(v) for f, v in blobs[0].items() if f != THUMBNAIL_FIELD},
              "thumbnail_bytes_mean": float(np.mean([len(d.thumbnail) for d in decoded]))}
    return Pool(arrays, blobs, [d.thumbnail for d in decoded], [(p, c) for _, p, c in images],
                [(d.width, d.height) for d in decoded],
                [content_digest(data, p, c, {}) for data, p, c in images], encode)


def make_items(engine: Engine, pool: Pool, start: int, count: int) -> list[NewItem]:
    """Items ``start`` .. ``start + count - 1``: pool images with noise on their fields."""
    rows = (start + np.arange(count)) % len(pool)
    tensors = tile_gallery({f: a[rows] for f, a in pool.arrays.items()}, count, seed=start)
    items = []
    for j, k in enumerate(rows):
        blobs = engine.codec.encode({f: a[j] for f, a in tensors.items()})
        blobs[THUMBNAIL_FIELD] = pool.thumbnails[k]
        person, camera = pool.labels[k]
        width, height = pool.sizes[k]
        items.append(NewItem(GalleryItem(new_image_id(), person, camera,
                                         filename=f"{start + j}.jpg", width=width,
                                         height=height), blobs, pool.digests[k]))
    return items


# -- Redis memory -------------------------------------------------------------------------------

def node_memory(ports: list[int]) -> dict[int, dict]:
    """{port: {"role", "used_memory"}} once every node has freed what it was freeing."""
    out = {}
    for port in ports:
        with redis.Redis(host=HOST, port=port, socket_timeout=10) as conn:
            deadline = time.monotonic() + 60
            while True:
                info = conn.info("memory")
                if not int(info.get("lazyfree_pending_objects", 0)) or \
                        time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            out[port] = {"role": conn.execute_command("ROLE")[0].decode(),
                         "used_memory": int(info["used_memory"])}
    return out


def memory_growth(before: dict[int, dict], after: dict[int, dict], items: int) -> dict:
    masters = {p: after[p]["used_memory"] - before[p]["used_memory"]
               for p in after if after[p]["role"] == "master"}
    replicas = {p: after[p]["used_memory"] - before[p]["used_memory"]
                for p in after if after[p]["role"] != "master"}
    total = sum(masters.values())
    return {"masters_bytes": total, "masters_bytes_per_item": total / items,
            "master_share": sorted((round(v / total, 3) if total else 0.0
                                    for v in masters.values()), reverse=True),
            "replicas_bytes": sum(replicas.values()) if replicas else None,
            "replicas_bytes_per_item": sum(replicas.values()) / items if replicas else None,
            "per_node": {str(p): {"role": after[p]["role"],
                                  "used_memory_before": before[p]["used_memory"],
                                  "used_memory_after": after[p]["used_memory"]}
                         for p in after}}


# -- one setup ----------------------------------------------------------------------------------

def fill(engine: Engine, store: RedisGalleryStore, pool: Pool, items: int, batch: int) -> dict:
    """``items`` items into ``GALLERY``, ``batch`` per ``add_items`` call, each call timed."""
    calls, retries = [], 0
    prepare_s = 0.0
    wall0 = time.perf_counter()
    next_report = 0.1
    for start in range(0, items, batch):
        t0 = time.perf_counter()
        new = make_items(engine, pool, start, min(batch, items - start))
        prepare_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for attempt in range(WRITE_RETRIES):
            try:
                result = store.add_items(GALLERY, new)
                break
            except (StoreUnavailable, WriteNotReplicated) as exc:
                retries += 1
                if attempt == WRITE_RETRIES - 1:
                    raise
                say(f"  retrying a write (same ids): {type(exc).__name__}: {exc}")
                time.sleep(0.2)
        calls.append(time.perf_counter() - t0)
        if len(result.added) + len(result.existing) != len(new) or result.conflicts:
            raise RuntimeError(f"add_items stored {len(result.added)} of {len(new)} items")
        done = start + len(new)
        if done >= next_report * items:
            say(f"  {done:,} / {items:,} items written")
            next_report += 0.1
    store_s = sum(calls)
    ms = [1e3 * c for c in calls]
    return {"items": items, "batch": batch, "calls": len(calls), "store_s": store_s,
            "images_per_s": items / store_s, "call_p50_ms": pct(ms, 50),
            "call_p95_ms": pct(ms, 95), "prepare_s": prepare_s,
            "wall_s": time.perf_counter() - wall0, "retried_calls": retries}


def http_upload(client: TestClient, images: list[tuple[bytes, str, str]], total: int,
                per_request: int) -> dict | None:
    if total <= 0:
        return None
    elapsed = []
    for start in range(0, total, per_request):
        chunk = [images[k % len(images)] for k in range(start, min(total, start + per_request))]
        files = [("images", (f"{start + j}.jpg", data, "image/jpeg"))
                 for j, (data, _, _) in enumerate(chunk)]
        data = {"person_id": [p for _, p, _ in chunk], "camera_id": [c for _, _, c in chunk],
                "image_id": [new_image_id() for _ in chunk]}
        t0 = time.perf_counter()
        r = client.post(f"/v1/galleries/{HTTP_GALLERY}/images", files=files, data=data)
        elapsed.append(time.perf_counter() - t0)
        if r.status_code != 201:
            raise RuntimeError(f"HTTP upload answered {r.status_code}: {r.text[:500]}")
    return {"images": total, "per_request": per_request, "requests": len(elapsed),
            "seconds": sum(elapsed), "images_per_s": total / sum(elapsed)}


def bench_setup(name: str, engine: Engine, args, pool: Pool, probes: list[bytes],
                uploads: list[tuple[bytes, str, str]], url: str, ports, shards: int,
                cluster: LocalRedisCluster | None) -> tuple[dict, RedisGalleryStore]:
    """Fill, measure and query one setup; returns its row and its store (data kept)."""
    say(f"{name}: {args.items:,} items, {shards} shard(s)")
    store = RedisGalleryStore(url, namespace=store_namespace(engine),
                              prefix=f"dsmi-bench-cluster-{uuid.uuid4().hex[:8]}:",
                              cluster=cluster is not None, default_shards=shards,
                              socket_timeout=args.socket_timeout)
    config, _ = store.create_gallery(GALLERY, shards=shards)
    before = node_memory(ports())
    row: dict = {"setup": name, "shards": config.shards, "cluster": cluster is not None,
                 "min_replicas": store.min_replicas}
    row["upload"] = fill(engine, store, pool, args.items, args.batch)
    if cluster is not None:
        row["wait_replicated"] = {str(p): n for p, n in cluster.wait_replicated(10_000).items()}
    row["memory"] = memory_growth(before, node_memory(ports()), args.items)
    size = store.gallery_size(GALLERY)
    if size != args.items:
        raise RuntimeError(f"{name}: the gallery holds {size} items, not {args.items}")
    settings = {"score_batch": engine.batch_size, "cache_max_bytes": 1 << 40}
    if args.rerank is not None:
        settings["rerank"] = args.rerank
    app = create_app(Settings(**settings), engine=engine, store=store)
    with TestClient(app) as client:
        say(f"{name}: first query (loads the gallery)")
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        wall, bodies = timed_queries(client, probes, 1, 0, top_k=args.top_k)
        row["first_query_s"] = time.perf_counter() - t0
        row["first_query_fetch_ms"] = bodies[0]["timings"]["fetch_ms"]
        row["process_bytes_per_item"] = (rss_bytes() - rss0) / args.items
        say(f"{name}: {args.queries} queries")
        row["two_stage"] = summary(*timed_queries(client, probes, args.queries, args.warmup,
                                                  top_k=args.top_k))
        if row["two_stage"]["resident"] is not True:
            raise RuntimeError(f"{name}: the queries were not resident")
        say(f"{name}: {args.http_images} images through the upload route")
        row["http_upload"] = http_upload(client, uploads, args.http_images, args.http_batch)
    del app, client
    gc.collect()
    say(f"{name}: {row['upload']['images_per_s']:,.0f} images/s into the store, "
        f"p50 {row['two_stage']['p50_ms']:.1f} ms, "
        f"{row['memory']['masters_bytes_per_item']:,.0f} B/item")
    return row, store


# -- the failover -------------------------------------------------------------------------------

def _error_kind(message: str) -> str:
    """A failed write's message without what differs between calls (ports, counts)."""
    message = message.split(" failed to ", 1)[-1]
    return re.sub(r"\d+", "N", message)[:160]


@dataclass
class Attempt:
    writer: int
    shard: int
    start: float       # time.monotonic()
    end: float
    outcome: str       # "ok", "unavailable", "not_replicated" or an exception's type name
    ids: tuple[str, ...]
    error: str = ""    # the exception's message, cut short
    existing: int = 0  # items an acknowledged retry found stored already


def failover(cluster: LocalRedisCluster, engine: Engine, pool: Pool, args,
             bulk_store: RedisGalleryStore) -> dict:
    prefix = f"dsmi-bench-failover-{uuid.uuid4().hex[:8]}:"
    # The service's settings in cluster mode (1 s socket timeout, WAIT for 1 replica, 1000 ms).
    store = RedisGalleryStore(cluster.seed_url, namespace=store_namespace(engine),
                              prefix=prefix, cluster=True, default_shards=FAILOVER_SHARDS)
    store.create_gallery(FAILOVER_GALLERY, shards=FAILOVER_SHARDS)
    tags = shard_tags(FAILOVER_GALLERY, FAILOVER_SHARDS)
    shard_master = [cluster.master_of_slot(key_slot(t.encode())) for t in tags]
    conf_master = cluster.master_of_slot(key_slot(FAILOVER_GALLERY.encode()))
    victim = next(m for m in shard_master if m != conf_master)
    victim_shards = [s for s, m in enumerate(shard_master) if m == victim]
    attempts: list[Attempt] = []
    lock = threading.Lock()
    stop = threading.Event()
    abandoned: list[tuple[str, ...]] = []

    def writer(w: int) -> None:
        target = w % FAILOVER_SHARDS
        counter = itertools.count()
        row = w
        while not stop.is_set():
            ids: list[str] = []
            while len(ids) < args.failover_batch:
                image_id = f"w{w}-{next(counter)}"
                if shard_of(image_id, FAILOVER_SHARDS) == target:
                    ids.append(image_id)
            items = []
            for image_id in ids:
                row = (row + 7) % len(pool)
                person, camera = pool.labels[row]
                items.append(NewItem(GalleryItem(image_id, person, camera,
                                                 filename=f"{image_id}.jpg"),
                                     pool.blobs[row], pool.digests[row]))
            first = time.monotonic()
            while True:
                t0 = time.monotonic()
                error, existing = "", 0
                try:
                    existing = len(store.add_items(FAILOVER_GALLERY, items).existing)
                    outcome = "ok"
                except StoreUnavailable as exc:
                    outcome, error = "unavailable", str(exc)
                except WriteNotReplicated as exc:
                    outcome, error = "not_replicated", str(exc)
                except Exception as exc:  # counted and retried: any of them is a finding
                    outcome, error = type(exc).__name__, str(exc)
                with lock:
                    attempts.append(Attempt(w, target, t0, time.monotonic(), outcome,
                                            tuple(ids), _error_kind(error), existing))
                if outcome == "ok":
                    break
                if time.monotonic() - first > 120:
                    with lock:
                        abandoned.append(tuple(ids))
                    break
                time.sleep(args.retry_pause)
            time.sleep(args.writer_pause)

    threads = [threading.Thread(target=writer, args=(w,), name=f"writer-{w}", daemon=True)
               for w in range(args.writers)]
    say(f"failover: {args.writers} writers, victim master {victim} (shards {victim_shards} "
        f"of the gallery; its settings key on {conf_master})")
    victim_memory = node_memory([victim])[victim]["used_memory"]
    for t in threads:
        t.start()
    time.sleep(3.0)  # steady state
    cluster.kill(victim)  # SIGKILL, then reaped: the kill has happened when it returns
    killed_at = time.monotonic()
    say("failover: master killed (SIGKILL); waiting for its replica")
    promoted_s = cluster.wait_for_failover(victim, timeout=60)
    restart_at = time.monotonic()
    say(f"failover: replica promoted after {promoted_s:.2f} s; restarting the killed node")
    heal_s = cluster.heal(timeout=180)
    healed_at = time.monotonic()
    say(f"failover: the killed node is back in sync after {healed_at - killed_at:.2f} s")

    def first_victim_ack() -> Attempt | None:
        with lock:
            done = [a for a in attempts if a.outcome == "ok" and a.shard in victim_shards
                    and a.start >= killed_at]
        return min(done, key=lambda a: a.end) if done else None

    deadline = time.monotonic() + 60
    while first_victim_ack() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # writes keep flowing after the recovery
    stop.set()
    for t in threads:
        t.join(timeout=180)
    still_running = sum(t.is_alive() for t in threads)

    with lock:
        done = list(attempts)
    oks = [a for a in done if a.outcome == "ok"]
    acknowledged = sorted({i for a in oks for i in a.ids})
    # Read back through a new client, once the cluster is whole again.
    checker = RedisGalleryStore(cluster.seed_url, namespace=store_namespace(engine),
                                prefix=prefix, cluster=True, socket_timeout=10)
    present: set[str] = set()
    for k in range(0, len(acknowledged), 256):
        present |= {item.image_id for item, _ in checker.fetch_items(
            FAILOVER_GALLERY, acknowledged[k:k + 256], [])}
    lost = sorted(set(acknowledged) - present)
    checker.close()
    bulk_size = bulk_store.gallery_size(GALLERY)

    ack = first_victim_ack()
    others = sorted(a.end for a in oks if a.shard not in victim_shards)
    gaps = [b - a for a, b in zip(others, others[1:], strict=False)
            if b >= killed_at - 1.0]
    outage_end = ack.end if ack else healed_at
    # Outcomes per half second around the kill, for a timeline.
    timeline: dict[int, dict[str, int]] = {}
    for a in done:
        slot = timeline.setdefault(int(np.floor((a.end - killed_at) / 0.5)),
                                   {"victim_ok": 0, "other_ok": 0, "failed": 0})
        key = "failed" if a.outcome != "ok" else (
            "victim_ok" if a.shard in victim_shards else "other_ok")
        slot[key] += 1
    outcomes: dict[str, int] = {}
    errors: dict[str, dict[str, int]] = {"victim_shards": {}, "other_shards": {}}
    for a in done:
        if a.outcome != "ok":
            outcomes[a.outcome] = outcomes.get(a.outcome, 0) + 1
            where = errors["victim_shards" if a.shard in victim_shards else "other_shards"]
            where[a.error] = where.get(a.error, 0) + 1
    after_kill = [a for a in done if a.shard not in victim_shards and a.end >= killed_at]
    result = {
        "writers": args.writers, "batch": args.failover_batch, "gallery_shards": FAILOVER_SHARDS,
        "victim": victim, "victim_shards": victim_shards, "settings_key_master": conf_master,
        "victim_used_memory": victim_memory,
        "node_timeout_ms": cluster.node_timeout_ms,
        "store": {"min_replicas": store.min_replicas, "wait_timeout_ms": store.wait_timeout_ms,
                  "socket_timeout_s": 1.0},
        "promoted_s": promoted_s,
        "restart_started_s": restart_at - killed_at,
        "heal_s": heal_s,
        "rejoined_in_sync_s": healed_at - killed_at,
        "victim_writes_accepted_s": (ack.end - killed_at) if ack else None,
        "other_shards_longest_pause_s": max(gaps) if gaps else None,
        "other_shards_acks_during_outage": sum(killed_at <= t <= outage_end for t in others),
        "other_shards_longest_attempt_s": max((a.end - a.start for a in after_kill),
                                              default=None),
        "attempts": len(done), "acknowledged_writes": len(oks),
        "acknowledged_images": len(acknowledged), "failed_attempts": outcomes,
        "errors": errors,
        # Retries that found every item stored: the failed attempt had written them.
        "retries_found_stored": {
            "victim_shards": sum(a.existing == len(a.ids) for a in oks
                                 if a.shard in victim_shards),
            "other_shards": sum(a.existing == len(a.ids) for a in oks
                                if a.shard not in victim_shards)},
        "abandoned_writes": len(abandoned),
        "writers_still_running": still_running,
        "acknowledged_lost": len(lost), "lost_ids": lost[:20],
        "bulk_gallery_size_after": bulk_size,
        "timeline_half_seconds_from_kill": [{"from_s": k * 0.5, **v}
                                            for k, v in sorted(timeline.items())],
    }
    store.clear()
    store.close()
    return result


# -- output -------------------------------------------------------------------------------------

def print_table(result: dict) -> None:
    m, e = result["model"], result["encode"]
    print(f"model {m['variant']} ({m['model_id']}), cache dtype {m['cache_dtype']} "
          f"(fields {', '.join(f'{f} {tuple(s)}' for f, s in m['fields'].items())}; "
          f"{', '.join(f'{f} {b:,} B' for f, b in e['blob_bytes'].items())}, JPEG thumbnail "
          f"{e['thumbnail_bytes_mean']:,.0f} B on average), {result['items']:,} items per setup, "
          f"load average {result['machine']['load_average'][0]:.2f} -> "
          f"{result['load_average_end'][0]:.2f} on {result['machine']['cpus_usable']} CPUs")
    print(f"engine encode ({e['images']} real images, not part of the store upload figures): "
          f"{e['images_per_s']:,.1f} images/s (decode + thumbnail "
          f"{e['decode_thumbnail_images_per_s']:,.0f}/s, trunk + side + codec "
          f"{e['trunk_side_codec_images_per_s']:,.1f}/s)")
    head = (f"{'setup':<18} {'shards':>6} {'store img/s':>11} {'call p50/p95 ms':>16} "
            f"{'HTTP img/s':>10} {'1st query s':>11} {'p50 ms':>7} {'p95 ms':>7} "
            f"{'store ms':>8} "
            f"{'masters B/item':>14} {'replicas B/item':>15}  masters' shares")
    print(head)
    for r in result["setups"]:
        up, mem, q = r["upload"], r["memory"], r["two_stage"]
        http = r["http_upload"]
        replicas = mem["replicas_bytes_per_item"]
        print(f"{r['setup']:<18} {r['shards']:>6} {up['images_per_s']:>11,.0f} "
              f"{up['call_p50_ms']:>7.1f} / {up['call_p95_ms']:>6.1f} "
              f"{(http['images_per_s'] if http else float('nan')):>10,.1f} "
              f"{r['first_query_s']:>11.2f} {q['p50_ms']:>7.1f} {q['p95_ms']:>7.1f} "
              f"{q['mean_fetch_ms']:>8.2f} "
              f"{mem['masters_bytes_per_item']:>14,.0f} "
              f"{(f'{replicas:,.0f}' if replicas is not None else '-'):>15}  "
              f"{' / '.join(f'{s:.2f}' for s in mem['master_share'])}")
    print(f"store img/s: add_items of {result['batch']} items per call (real blobs and "
          "thumbnails, fresh ids), the trunk's encoding excluded; cluster writes WAIT for 1 "
          "replica. HTTP: the upload route in-process, trunk included. Queries: resident "
          f"two-stage (rerank {result['setups'][0]['two_stage']['rescored']}), top "
          f"{result['top_k']}, in-process app; store ms: a query's mean time on the store (the "
          "resident copy's check for changes); 1st query: loads the gallery from the store.")
    f = result.get("failover")
    if f:
        def s(v):
            return "-" if v is None else f"{v:.2f} s"
        print(f"failover (cluster-node-timeout {f['node_timeout_ms']} ms, {f['writers']} writers "
              f"x {f['batch']} items, {f['gallery_shards']}-shard gallery, the "
              f"{result['items']:,}-item gallery on the cluster): master SIGKILLed -> replica "
              f"promoted {s(f['promoted_s'])}; restarted node in sync "
              f"{s(f['rejoined_in_sync_s'])}; writes on the killed master's slots accepted "
              f"again {s(f['victim_writes_accepted_s'])}; other shards' longest pause "
              f"{s(f['other_shards_longest_pause_s'])}")
        print(f"  {f['acknowledged_writes']:,} acknowledged writes ({f['acknowledged_images']:,} "
              f"images), failed attempts retried {f['failed_attempts']}, abandoned "
              f"{f['abandoned_writes']}; acknowledged writes lost: {f['acknowledged_lost']}; "
              f"{result['items']:,}-item gallery afterwards: {f['bulk_gallery_size_after']:,}")


def main(argv=None) -> int:
    args = parse_args(argv)
    engine = load_engine(Settings(model_dir=args.model_dir, providers=["cpu"]))
    machine = machine_info()
    limits = Settings()
    say(f"model {engine.variant} ({engine.model_id}), cache dtype {engine.cache_dtype}; "
        f"encoding {args.pool} real images")
    pool = build_pool(engine, limits, args.pool)
    probes = [data for data, _, _ in real_images(50, "val")]
    uploads = real_images(max(1, min(args.http_images, 512)), "train")
    result: dict = {
        "command": "python -m bench.cluster_bench " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "model": {"variant": engine.variant, "model_id": engine.model_id,
                  "providers": engine.providers, "cache_dtype": engine.cache_dtype,
                  "fields": {f: list(s) for f, s in engine.codec.spec.items()}},
        "items": args.items, "batch": args.batch, "top_k": args.top_k, "machine": machine,
        "encode": pool.encode, "setups": []}

    with LocalRedis() as single:
        row, store = bench_setup("one Redis", engine, args, pool, probes, uploads, single.url,
                                 lambda: [single.port], 1, None)
        store.close()
        result["setups"].append(row)
    with LocalRedisCluster(masters=3, replicas_per_master=1) as cluster:
        result["cluster"] = {"masters": 3, "replicas_per_master": 1,
                             "node_timeout_ms": cluster.node_timeout_ms}
        row, store = bench_setup("cluster, 1 shard", engine, args, pool, probes, uploads,
                                 cluster.seed_url, lambda: cluster.live_ports, 1, cluster)
        store.close()
        cluster.flushall()  # this cluster's own servers: nothing else is in them
        result["setups"].append(row)
        row, store = bench_setup("cluster, 3 shards", engine, args, pool, probes, uploads,
                                 cluster.seed_url, lambda: cluster.live_ports, 3, cluster)
        result["setups"].append(row)
        if not args.no_failover:
            result["failover"] = failover(cluster, engine, pool, args, store)
        store.close()
    result["load_average_end"] = list(os.getloadavg())
    print_table(result)
    write_results(args.out, result)
    lost = result.get("failover", {}).get("acknowledged_lost", 0)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
