"""The service on a real Redis Cluster (3 masters + 3 replicas on loopback ports, started by
the ``redis_cluster`` fixture): sharded galleries spread over the masters and rank exactly as
unsharded ones, replicas acknowledge writes, and uploads survive a master killed with SIGKILL."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from redis.crc import key_slot

from service.app import create_app, store_namespace
from service.domain import WriteNotReplicated
from service.settings import Settings
from service.store import RedisGalleryStore
from service.store.base import shard_of
from tests.service.test_store_sharding import named
from tests.service_support import (
    LIMITS,
    REDIS_URL,
    ThreadedServer,
    delete_prefix,
    image_bytes,
    new_prefix,
    redis_client,
)


@pytest.fixture
def cluster_store(redis_cluster):
    store = RedisGalleryStore(redis_cluster.seed_url, namespace="m", prefix=new_prefix(),
                              cluster=True, default_shards=3)
    yield store
    store.clear()
    store.close()


def test_a_sharded_gallery_spreads_over_every_master(redis_cluster, cluster_store):
    items = named(60)
    cluster_store.add_items("g", items)
    config, shards = cluster_store._layout("g")
    holding = set()
    for image_id in (x.item.image_id for x in items):
        tag_key = shards[shard_of(image_id, config.shards)].ids
        holding.add(redis_cluster.master_of_slot(key_slot(tag_key)))
    assert holding == {port for port, _ in redis_cluster.masters()}
    assert cluster_store.list_galleries() == {"g": 60}
    assert cluster_store.gallery_size("g") == 60


def test_cluster_writes_are_acknowledged_by_a_replica(redis_cluster, cluster_store):
    assert cluster_store.min_replicas == 1  # the default in cluster mode
    result = cluster_store.add_items("g", named(9))
    assert len(result.added) == 9
    # Every shard's keys are on the replica of its master once the write returned.
    config, shards = cluster_store._layout("g")
    for shard in shards:
        master = redis_cluster.master_of_slot(key_slot(shard.ids))
        for replica in redis_cluster.replicas_of(master):
            conn = redis_client_at(replica)
            conn.execute_command("READONLY")
            assert conn.zcard(shard.ids) == cluster_store.client.zcard(shard.ids)
            conn.close()


def test_a_write_no_replica_acknowledges_is_refused_in_time(redis_with_replica):
    redis_with_replica.wait_in_sync()  # another test of the session may have paused it
    store = RedisGalleryStore(redis_with_replica.url, namespace="m", prefix=new_prefix(),
                              min_replicas=1, wait_timeout_ms=700)
    try:
        assert len(store.add_items("g", named(2)).added) == 2
        with redis_with_replica.replica_paused():
            start = time.monotonic()
            with pytest.raises(WriteNotReplicated):
                store.add_items("g", named(2, start=10))
            assert time.monotonic() - start < 2.0  # bounded by the wait timeout
        assert store.gallery_size("g") == 4  # whole on the master; a retry is a no-op
        assert store.add_items("g", named(2, start=10)).added == []
    finally:
        store.clear()
        store.close()


def redis_client_at(port: int):
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)


def _upload(client, gallery: str, seeds: list[int], ids: list[str]):
    files = [("images", (f"{s}.jpg", image_bytes(s), "image/jpeg")) for s in seeds]
    data = {"person_id": [f"p{s % 5}" for s in seeds], "camera_id": ["c1"] * len(seeds),
            "image_id": ids}
    return client.post(f"/v1/galleries/{gallery}/images", files=files, data=data)


def _ranked(client, gallery: str, seed: int) -> list[tuple[str, float]]:
    r = client.post(f"/v1/galleries/{gallery}/query", data={"top_k": 100},
                    files={"image": ("q.jpg", image_bytes(seed), "image/jpeg")})
    assert r.status_code == 200, r.text
    return [(x["image_id"], round(x["score"], 5)) for x in r.json()["results"]]


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_rankings_on_a_sharded_cluster_gallery_equal_one_redis(redis_cluster, engine,
                                                               resident):
    redis_client()  # skips without the single Redis
    namespace = store_namespace(engine)
    single = RedisGalleryStore(REDIS_URL, namespace=namespace, prefix=new_prefix())
    sharded = RedisGalleryStore(redis_cluster.seed_url, namespace=namespace,
                                prefix=new_prefix(), cluster=True, default_shards=3)
    settings = {**LIMITS, **({} if resident else {"cache_max_bytes": 0})}
    seeds = list(range(24))
    try:
        with TestClient(create_app(Settings(**settings), engine=engine, store=single)) as a, \
                TestClient(create_app(Settings(**settings), engine=engine,
                                      store=sharded)) as b:
            for client in (a, b):
                for start in (0, 12):
                    chunk = seeds[start:start + 12]
                    r = _upload(client, "g", chunk, [f"img{s}" for s in chunk])
                    assert r.status_code == 201, r.text
            assert b.get("/v1/galleries/g").json()["shards"] == 3
            for probe in (100, 101, 102):
                ranked = _ranked(b, "g", probe)
                assert len(ranked) == 24 and ranked == _ranked(a, "g", probe)
    finally:
        delete_prefix(single.prefix)
        single.close()
        sharded.clear()
        sharded.close()


def test_uploads_survive_a_master_killed_mid_stream(redis_cluster, engine):
    """20 clients upload with their own image ids, retrying 503s; one master is killed with
    SIGKILL; after its replica takes over (and a new replica is back), every upload answered
    2xx is listed and ranked, and no request got a 500."""
    store = RedisGalleryStore(redis_cluster.seed_url, namespace=store_namespace(engine),
                              prefix=new_prefix(), cluster=True, default_shards=3,
                              wait_timeout_ms=500)
    app = create_app(Settings(**LIMITS, max_inflight_uploads=32), engine=engine, store=store)
    acknowledged: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()
    started = threading.Event()
    uploads_each = 6

    def client_loop(c: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for u in range(uploads_each):
                ids = [f"c{c}-u{u}-{k}" for k in range(2)]
                seeds = [1000 * c + 10 * u + k for k in range(2)]
                deadline = time.monotonic() + 60
                while True:
                    try:
                        r = _upload(http, "g", seeds, ids)
                        status = r.status_code
                    except httpx.TransportError:
                        status = -1  # the answer was lost: retry with the same ids
                    with lock:
                        statuses.append(status)
                    if status in (200, 201):
                        with lock:
                            acknowledged.extend(ids)
                        break
                    if status not in (503, -1) or time.monotonic() > deadline:
                        return
                    time.sleep(0.2)
                started.set()

    try:
        with ThreadedServer(app) as server:
            threads = [threading.Thread(target=client_loop, args=(c, server.url))
                       for c in range(20)]
            for t in threads:
                t.start()
            assert started.wait(60)
            victim = redis_cluster.masters()[0][0]
            redis_cluster.kill(victim)
            failover_s = redis_cluster.wait_for_failover(victim, timeout=30)
            redis_cluster.heal()  # the killed node comes back, as its old replica's replica
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads)
            assert 500 not in statuses and all(s in (200, 201, 503, -1) for s in statuses)
            assert len(acknowledged) == 20 * uploads_each * 2, (failover_s, statuses)
            with httpx.Client(base_url=server.url, timeout=30) as http:
                listed = []
                for offset in range(0, 1000, 100):
                    page = http.get("/v1/galleries/g/images",
                                    params={"offset": offset, "limit": 100}).json()
                    listed += [x["image_id"] for x in page["images"]]
                assert sorted(listed) == sorted(acknowledged)
                r = http.post("/v1/galleries/g/query", data={"top_k": 1000},
                              files={"image": ("q.jpg", image_bytes(7), "image/jpeg")})
                assert r.status_code == 200
                assert sorted(x["image_id"] for x in r.json()["results"]) == sorted(acknowledged)
    finally:
        redis_cluster.heal()
        store.clear()
        store.close()
