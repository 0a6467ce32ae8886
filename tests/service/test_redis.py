"""The service on a real Redis: galleries survive a restart, concurrent uploaders over real
HTTP lose nothing, and a Redis outage is a 503 that heals by itself when Redis returns."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app, store_namespace
from service.engine import Engine
from service.settings import Settings
from service.store import RedisGalleryStore
from tests.service_support import (
    REDIS_URL,
    TcpProxy,
    ThreadedServer,
    delete_prefix,
    image_bytes,
    new_prefix,
    redis_client,
    service_engine,
)


@pytest.fixture(scope="module")
def engine():
    return service_engine()


@pytest.fixture
def prefix():
    redis_client()  # skips without Redis
    prefix = new_prefix()
    yield prefix
    delete_prefix(prefix)


def upload(client, gallery, seeds, camera="1"):
    files = [("images", (f"{s}.jpg", image_bytes(s))) for s in seeds]
    return client.post(f"/v1/galleries/{gallery}/images", files=files,
                       data={"person_id": [f"p{s}" for s in seeds],
                             "camera_id": [camera] * len(seeds)})


def query(client, gallery, seed, **fields):
    return client.post(f"/v1/galleries/{gallery}/query",
                       files={"image": ("probe.jpg", image_bytes(seed))}, data=fields)


def test_galleries_survive_a_restart(engine, prefix):
    settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix)
    with TestClient(create_app(settings, engine=engine)) as first:
        assert upload(first, "hall", range(5)).status_code == 201
        assert upload(first, "yard", [7]).status_code == 201
        listing = first.get("/v1/galleries/hall/images").json()
        ranking = query(first, "hall", 3, top_k=5).json()["results"]
    # A new process: a freshly loaded engine (same model) and a new app over the same Redis.
    fresh = Engine(engine.model_dir, providers=["CPUExecutionProvider"], batch_size=16)
    app = create_app(settings, engine=fresh)
    with TestClient(app) as second:
        assert app.state.store.persistent is True
        assert second.get("/readyz").json()["store"] == "redis"
        assert second.get("/v1/galleries/hall/images").json() == listing
        assert second.get("/v1/galleries").json()["galleries"] == [
            {"name": "hall", "size": 5}, {"name": "yard", "size": 1}]
        again = query(second, "hall", 3, top_k=5).json()["results"]
        assert [r["image_id"] for r in again] == [r["image_id"] for r in ranking]
        assert again[0]["person_id"] == "p3"


def test_twenty_concurrent_uploaders_lose_nothing(engine, prefix):
    store = RedisGalleryStore(REDIS_URL, namespace=store_namespace(engine), prefix=prefix)
    uploaders, per_upload = 20, 3
    # Admit them all at once: this is about concurrent writes, not about overload.
    app = create_app(Settings(max_inflight_uploads=uploaders, max_inflight_queries=uploaders),
                     engine=engine, store=store)
    barrier = threading.Barrier(uploaders + 2)
    stored: dict[int, list[str]] = {}
    failures: list[str] = []
    query_statuses: list[int] = []

    with ThreadedServer(app) as server:
        def uploader(k: int) -> None:
            seeds = [1000 + k * per_upload + j for j in range(per_upload)]
            with httpx.Client(base_url=server.url, timeout=120) as http:
                barrier.wait()
                r = upload(http, "crowd", seeds, camera=str(k % 3))
                if r.status_code != 201:
                    failures.append(r.text)
                    return
                stored[k] = [i["image_id"] for i in r.json()["images"]]

        def querier() -> None:  # reads while the writes go on
            with httpx.Client(base_url=server.url, timeout=120) as http:
                barrier.wait()
                for _ in range(3):
                    r = query(http, "crowd", 1000, top_k=5)
                    query_statuses.append(r.status_code)

        threads = [threading.Thread(target=uploader, args=(k,)) for k in range(uploaders)]
        threads += [threading.Thread(target=querier) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not failures, failures[:3]
        listing = httpx.get(f"{server.url}/v1/galleries/crowd/images",
                            params={"limit": 1000}).json()
    ids = [i["image_id"] for i in listing["images"]]
    assert listing["total"] == uploaders * per_upload == len(ids) == len(set(ids))
    assert sorted(ids) == sorted(i for batch in stored.values() for i in batch)
    for batch in stored.values():  # one upload's images stay together, in order
        start = ids.index(batch[0])
        assert ids[start:start + per_upload] == batch
    # Queries that ran before the gallery existed are 404s; none may be anything else.
    assert set(query_statuses) <= {200, 404}, query_statuses


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_redis_outage_is_a_503_and_heals_without_a_restart(engine, prefix):
    proxy = TcpProxy(("127.0.0.1", 6379))
    proxy.start()
    settings = Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0", redis_prefix=prefix,
                        redis_socket_timeout=2, redis_connect_timeout=1)
    app = create_app(settings, engine=engine)
    try:
        with TestClient(app) as c:
            assert upload(c, "g", [1, 2]).status_code == 201
            assert c.get("/readyz").status_code == 200

            proxy.stop()  # Redis vanishes
            ready = c.get("/readyz")
            assert ready.status_code == 503
            error = ready.json()["error"]
            assert error["code"] == "not_ready" and "redis" in error["message"]
            assert error["details"]["checks"]["model"] == "ok"
            for r in (upload(c, "g", [3, 4]), query(c, "g", 1),
                      c.get("/v1/galleries/g/images"), c.delete("/v1/galleries/g")):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable"
                assert r.headers["retry-after"]
            assert c.get("/healthz").status_code == 200  # alive all along
            metrics = c.get("/metrics")
            assert metrics.status_code == 200 and 'dsmi_store_up{store="redis"} 0.0' in metrics.text

            proxy.start()  # Redis is back: the same app recovers by itself
            wait_until(lambda: c.get("/readyz").status_code == 200)
            listing = c.get("/v1/galleries/g/images").json()
            assert listing["total"] == 2  # nothing lost, nothing half-written
            assert [i["person_id"] for i in listing["images"]] == ["p1", "p2"]
            assert query(c, "g", 2).json()["results"][0]["person_id"] == "p2"
            assert upload(c, "g", [3]).status_code == 201
    finally:
        proxy.stop()


def test_a_hung_redis_is_a_fast_503_on_every_route(engine, prefix):
    """Redis stopped, not dead: connections stay open and nothing comes back. Every route
    answers 503 within 2 s with the default timeouts, and the body names no address,
    database or exception; the log keeps those."""
    proxy = TcpProxy(("127.0.0.1", 6379))
    proxy.start()
    settings = Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/3", redis_prefix=prefix)
    app = create_app(settings, engine=engine)
    try:
        with TestClient(app) as c:
            assert upload(c, "g", [1, 2]).status_code == 201
            proxy.hang()
            calls = {"readyz": lambda: c.get("/readyz"), "upload": lambda: upload(c, "g", [3]),
                     "query": lambda: query(c, "g", 1),
                     "list": lambda: c.get("/v1/galleries/g/images"),
                     "galleries": lambda: c.get("/v1/galleries"),
                     "get": lambda: c.get(f"/v1/galleries/g/images/{'0' * 32}"),
                     "delete": lambda: c.delete("/v1/galleries/g")}
            for name, call in calls.items():
                started = time.monotonic()
                r = call()
                took = time.monotonic() - started
                assert r.status_code == 503, (name, r.text)
                assert took < 2.0, (name, took)
                assert r.headers["retry-after"]
                for leak in (str(proxy.port), "127.0.0.1", "/3", "Timeout", "Error"):
                    assert leak not in r.text, (name, r.text)
            proxy.resume()
            wait_until(lambda: c.get("/readyz").status_code == 200)
            assert c.get("/v1/galleries/g/images").json()["total"] == 2
    finally:
        proxy.stop()
