"""Through the HTTP API: uploads with the client's own image ids (a retry after a dropped
response stores nothing twice; other content under a stored id is a 409), gallery settings
(PUT), and retention measured by a clock the test controls."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app, store_namespace, sweep_expired_once
from service.settings import Settings
from service.store import MemoryGalleryStore, RedisGalleryStore
from tests.service.test_store_sharding import DAY, Clock
from tests.service_support import (
    LIMITS,
    REDIS_URL,
    ThreadedServer,
    delete_prefix,
    image_bytes,
    new_prefix,
    redis_client,
)


@pytest.fixture(params=["memory", "redis"])
def app_and_clock(request, engine):
    clock = Clock()
    prefix = None
    if request.param == "redis":
        redis_client()
        prefix = new_prefix()
        store = RedisGalleryStore(REDIS_URL, namespace=store_namespace(engine), prefix=prefix,
                                  default_shards=2, clock=clock)
    else:
        store = MemoryGalleryStore(store_namespace(engine), default_shards=2, clock=clock)
    app = create_app(Settings(**LIMITS), engine=engine, store=store)
    yield app, clock
    if prefix:
        delete_prefix(prefix)


def upload_form(seeds: list[int], ids: list[str] | None, person: str = "p"):
    files = [("images", (f"{s}.jpg", image_bytes(s), "image/jpeg")) for s in seeds]
    data = {"person_id": [f"{person}{s}" for s in seeds], "camera_id": ["c1"] * len(seeds)}
    if ids is not None:
        data["image_id"] = ids
    return files, data


def test_a_retry_after_a_dropped_response_stores_nothing_twice(app_and_clock):
    app, _ = app_and_clock
    ids = ["cam7-000001", "cam7-000002", "cam7-000003"]
    files, data = upload_form([1, 2, 3], ids)
    with ThreadedServer(app) as server:
        # The request goes out whole; its answer is never read: the connection is dropped.
        raw = httpx.Request("POST", f"{server.url}/v1/galleries/g/images", files=files,
                            data=data)
        body = raw.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in raw.headers.items())
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(f"POST /v1/galleries/g/images HTTP/1.1\r\n{head}\r\n".encode() + body)
            with httpx.Client(base_url=server.url) as http:
                deadline = time.monotonic() + 30
                while http.get("/v1/galleries/g").status_code != 200 or \
                        http.get("/v1/galleries/g").json()["size"] < 3:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        with httpx.Client(base_url=server.url) as http:
            stored = http.get("/v1/galleries/g/images").json()["images"]
            retry = http.post("/v1/galleries/g/images", files=files, data=data)
            assert retry.status_code == 200, retry.text
            answer = retry.json()
            assert answer["count"] == 0 and answer["already_stored"] == 3
            assert answer["gallery_size"] == 3
            assert answer["images"] == stored  # the stored items, as stored the first time
            assert http.get("/v1/galleries/g").json()["size"] == 3


def test_other_content_under_a_stored_id_is_a_409_and_nothing_is_stored(app_and_clock):
    app, _ = app_and_clock
    with TestClient(app) as client:
        files, data = upload_form([1, 2], ["a-1", "a-2"])
        assert client.post("/v1/galleries/g/images", files=files, data=data).status_code == 201
        files, data = upload_form([9, 3], ["a-1", "a-3"])  # a-1 with another image
        r = client.post("/v1/galleries/g/images", files=files, data=data)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "image_conflict"
        assert r.json()["error"]["details"]["image_ids"] == ["a-1"]
        assert client.get("/v1/galleries/g").json()["size"] == 2
        assert client.get("/v1/galleries/g/images/a-3").status_code == 404
        files, data = upload_form([1, 2], ["a-1", "a-2"], person="q")  # other labels
        assert client.post("/v1/galleries/g/images", files=files, data=data).status_code == 409
        files, data = upload_form([1, 1], ["b-1", "b-1"])
        r = client.post("/v1/galleries/g/images", files=files, data=data)
        assert r.status_code == 422 and r.json()["error"]["code"] == "duplicate_image_id"
        files, data = upload_form([1], ["bad id!"])
        assert client.post("/v1/galleries/g/images", files=files, data=data).status_code == 422
        mixed = client.post("/v1/galleries/g/images", files=upload_form([2, 4], None)[0],
                            data={**upload_form([2, 4], ["a-2", "a-4"])[1]})
        assert mixed.status_code == 201
        assert mixed.json()["count"] == 1 and mixed.json()["already_stored"] == 1


def test_gallery_settings_are_set_once(app_and_clock):
    app, _ = app_and_clock
    with TestClient(app) as client:
        r = client.put("/v1/galleries/g", json={"shards": 3, "retention_days": 2})
        assert r.status_code == 201
        assert (r.json()["shards"], r.json()["retention_days"], r.json()["size"]) == (3, 2, 0)
        assert client.put("/v1/galleries/g", json={"shards": 3}).status_code == 200
        r = client.put("/v1/galleries/g", json={"retention_days": 5})
        assert r.status_code == 409 and r.json()["error"]["code"] == "gallery_conflict"
        assert client.put("/v1/galleries/h", json={"shards": 0}).status_code == 422
        assert client.put("/v1/galleries/h", json={"colour": 1}).status_code == 422
        assert client.get("/v1/galleries/h").status_code == 404
        assert client.put("/v1/galleries/h").json()["shards"] == 2  # the service's default
        assert client.get("/v1/galleries/g").json()["retention_days"] == 2


def test_expired_images_leave_answers_at_once_and_are_purged_and_counted(app_and_clock):
    app, clock = app_and_clock
    with TestClient(app) as client:
        assert client.put("/v1/galleries/g", json={"retention_days": 1}).status_code == 201
        files, data = upload_form([1, 2, 3], ["old-1", "old-2", "old-3"])
        assert client.post("/v1/galleries/g/images", files=files, data=data).status_code == 201
        clock.now += DAY / 2
        files, data = upload_form([4, 5], ["new-4", "new-5"])
        assert client.post("/v1/galleries/g/images", files=files, data=data).status_code == 201

        def query() -> list[str]:
            r = client.post("/v1/galleries/g/query", data={"top_k": 10},
                            files={"image": ("q.jpg", image_bytes(1), "image/jpeg")})
            assert r.status_code == 200, r.text
            return sorted(x["image_id"] for x in r.json()["results"])

        assert query() == ["new-4", "new-5", "old-1", "old-2", "old-3"]  # now resident
        assert client.get("/v1/galleries/g/images/old-1/thumbnail").status_code == 200
        clock.now += DAY / 2 + 1  # the old three are a day and a second old
        assert query() == ["new-4", "new-5"]
        listing = client.get("/v1/galleries/g/images").json()
        assert listing["total"] == 2 and [x["image_id"] for x in listing["images"]] == [
            "new-4", "new-5"]
        assert client.get("/v1/galleries/g/images/old-1/thumbnail").status_code == 404
        assert client.get("/v1/galleries/g/images/old-2").status_code == 404
        assert client.get("/v1/galleries").json()["galleries"] == [{"name": "g", "size": 2}]
        assert sweep_expired_once(app) == 3
        assert sweep_expired_once(app) == 0
        assert query() == ["new-4", "new-5"]  # the resident copy replayed the purge
        metrics = client.get("/metrics").text
        assert "dsmi_images_expired_total 3.0" in metrics
