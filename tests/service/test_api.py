"""The matching service's API against the real app (in-process client), with both stores:
uploads, listing, deletion, ranking, filters, bad input, API keys, health and metrics."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from service.store.base import shard_of
from tests.conftest import ROOT
from tests.service_support import image_bytes, make_client, png_header_bomb


@pytest.fixture
def memory_client(engine):
    app, _ = make_client(engine, "memory")
    with TestClient(app) as c:
        yield c


def upload(client, gallery: str, images: list[bytes], person_ids=None, camera_ids=None,
           names=None, headers=None, **fields):
    n = len(images)
    files = [("images", ((names or [f"img{k}.jpg" for k in range(n)])[k], data,
                         "application/octet-stream")) for k, data in enumerate(images)]
    data = {"person_id": person_ids or [f"p{k}" for k in range(n)],
            "camera_id": camera_ids or ["1"] * n, **fields}
    return client.post(f"/v1/galleries/{gallery}/images", files=files, data=data,
                       headers=headers)


def query(client, gallery: str, image: bytes, **fields):
    return client.post(f"/v1/galleries/{gallery}/query",
                       files={"image": ("probe.jpg", image, "application/octet-stream")},
                       data=fields)


def assert_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# -- galleries ----------------------------------------------------------------------------------

def test_upload_list_get_and_delete(client):
    r = upload(client, "lobby", [image_bytes(1), image_bytes(2)], ["alice", "bob"], ["1", "2"],
               names=["a.jpg", "b.jpg"], metadata='{"site": "gate 3"}')
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["count"] == 2 and body["gallery_size"] == 2 and body["gallery"] == "lobby"
    alice, bob = body["images"]
    assert (alice["person_id"], alice["camera_id"], alice["filename"]) == ("alice", "1", "a.jpg")
    assert (bob["person_id"], bob["camera_id"]) == ("bob", "2")
    assert alice["metadata"] == bob["metadata"] == {"site": "gate 3"}
    assert (alice["width"], alice["height"]) == (48, 96)
    assert alice["image_id"] != bob["image_id"]

    listed = client.get("/v1/galleries/lobby/images").json()
    assert listed["total"] == 2 and [i["image_id"] for i in listed["images"]] == [
        alice["image_id"], bob["image_id"]]
    page = client.get("/v1/galleries/lobby/images", params={"offset": 1, "limit": 1}).json()
    assert [i["image_id"] for i in page["images"]] == [bob["image_id"]]
    assert client.get(f"/v1/galleries/lobby/images/{alice['image_id']}").json() == alice
    assert client.get("/v1/galleries").json()["galleries"] == [{"name": "lobby", "size": 2}]

    r = client.delete(f"/v1/galleries/lobby/images/{alice['image_id']}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert_error(client.get(f"/v1/galleries/lobby/images/{alice['image_id']}"), 404,
                 "image_not_found")
    assert_error(client.delete(f"/v1/galleries/lobby/images/{alice['image_id']}"), 404)
    assert client.get("/v1/galleries/lobby/images").json()["total"] == 1

    r = client.delete("/v1/galleries/lobby")
    assert r.status_code == 200 and r.json() == {"gallery": "lobby", "deleted_images": 1}
    for response in (client.get("/v1/galleries/lobby/images"),
                     client.get(f"/v1/galleries/lobby/images/{bob['image_id']}"),
                     client.delete("/v1/galleries/lobby"),
                     query(client, "lobby", image_bytes(1))):
        assert_error(response, 404, "gallery_not_found")


def test_metadata_per_image_or_for_all(memory_client):
    images = [image_bytes(1), image_bytes(2)]
    per_image = upload(memory_client, "g", images, metadata=['{"n": 1}', '{"n": 2}']).json()
    assert [i["metadata"] for i in per_image["images"]] == [{"n": 1}, {"n": 2}]
    array = upload(memory_client, "g", images, metadata='[{"n": 3}, {"n": 4}]').json()
    assert [i["metadata"] for i in array["images"]] == [{"n": 3}, {"n": 4}]
    for bad in ('{"n": 1', '"text"', '[{"n": 1}]', ['{}', '{}', '{}'],
                json.dumps({"x": "y" * 20_000})):
        assert_error(upload(memory_client, "g", images, metadata=bad), 422, "invalid_metadata")
    assert memory_client.get("/v1/galleries/g/images").json()["total"] == 4


@pytest.mark.parametrize("fields, what", [
    ({"person_id": ["p0"]}, "one person_id for two images"),
    ({"camera_id": ["1", "1", "1"]}, "three camera_ids for two images"),
])
def test_labels_must_match_the_images(memory_client, fields, what):
    files = [("images", (f"{k}.jpg", image_bytes(k))) for k in range(2)]
    data = {"person_id": ["p0", "p1"], "camera_id": ["1", "1"], **fields}
    r = memory_client.post("/v1/galleries/g/images", files=files, data=data)
    assert_error(r, 422, "field_count_mismatch")
    assert_error(memory_client.get("/v1/galleries/g/images"), 404)


def test_missing_fields_and_bad_names_are_422(memory_client):
    files = [("images", ("a.jpg", image_bytes(1)))]
    cases = [
        memory_client.post("/v1/galleries/g/images", files=files, data={"camera_id": "1"}),
        memory_client.post("/v1/galleries/g/images", files=files, data={"person_id": "1"}),
        memory_client.post("/v1/galleries/g/images", data={"person_id": "1", "camera_id": "1"}),
        memory_client.post("/v1/galleries/g/images", files=files,
                           data={"person_id": "  ", "camera_id": "1"}),
        memory_client.post("/v1/galleries/g/images", files=files,
                           data={"person_id": "x" * 129, "camera_id": "1"}),
        memory_client.post("/v1/galleries/g/images", json={"person_id": "1"}),
        upload(memory_client, "bad name", [image_bytes(1)]),
        upload(memory_client, "-dash-first", [image_bytes(1)]),
        memory_client.get("/v1/galleries/g/images/.not-an-id"),  # ids start alphanumeric
        memory_client.get("/v1/galleries/g/images", params={"limit": 0}),
        memory_client.get("/v1/galleries/g/images", params={"offset": -1}),
        memory_client.get("/v1/galleries/g/images", params={"offset": 10**20}),
    ]
    for r in cases:
        error = assert_error(r, 422, "validation_error")
        assert isinstance(error["details"], list) and error["details"][0]["loc"]


def test_too_many_images_in_one_upload_is_413(engine):
    app, _ = make_client(engine, "memory", max_images_per_upload=2)
    with TestClient(app) as c:
        assert_error(upload(c, "g", [image_bytes(k) for k in range(3)]), 413, "too_many_images")


# -- query ---------------------------------------------------------------------------------

def build_gallery(client, n: int, cameras=("1",)) -> list[dict]:
    images = [image_bytes(100 + k) for k in range(n)]
    r = upload(client, "g", images, [f"p{k}" for k in range(n)],
               [cameras[k % len(cameras)] for k in range(n)])
    assert r.status_code == 201, r.text
    return r.json()["images"]


def test_query_ranks_the_gallery_like_the_engine(client, engine):
    # 40 items, 16 per scoring chunk: the running top-k spans three chunks.
    stored = build_gallery(client, 40)
    probe = image_bytes(100 + 27)  # the bytes of gallery item 27
    r = query(client, "g", probe, top_k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["gallery_size"] == 40 and body["scored"] == 40 and body["top_k"] == 5
    results = body["results"]
    assert [x["rank"] for x in results] == [1, 2, 3, 4, 5]
    assert results[0]["image_id"] == stored[27]["image_id"]
    assert results[0]["person_id"] == "p27" and results[0]["score"] > 0.999
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:], strict=False))
    for key in ("encode_ms", "fetch_ms", "score_ms", "total_ms"):
        assert body["timings"][key] >= 0
    assert body["timings"]["total_ms"] >= body["timings"]["score_ms"]

    # The engine alone, on the same images: the same scores, the same order.
    gallery = engine.prepare_gallery(engine.encode(
        np.stack([engine.preprocess(image_bytes(100 + k)) for k in range(40)]), "b"))
    expected = engine.score(engine.prepare_probe(engine.encode(
        engine.preprocess(probe)[None], "a")), [gallery])
    everything = query(client, "g", probe, top_k=1000).json()["results"]
    assert len(everything) == 40
    by_id = {x["image_id"]: x["score"] for x in everything}
    np.testing.assert_allclose([by_id[s["image_id"]] for s in stored], expected, atol=1e-5)
    assert [x["image_id"] for x in everything[:5]] == [x["image_id"] for x in results]


@pytest.fixture
def streaming_client(engine):
    """No resident galleries: every query streams its gallery from the store."""
    app, _ = make_client(engine, "memory", cache_max_bytes=0)
    with TestClient(app) as c:
        yield c


def test_query_reads_the_gallery_one_scoring_batch_at_a_time(streaming_client, engine):
    memory_client = streaming_client
    build_gallery(memory_client, 40)
    store = memory_client.app.state.store
    chunks = []
    scan = store.iter_chunks

    def spy(gallery, fields, chunk_size):
        for chunk in scan(gallery, fields, chunk_size):
            chunks.append((chunk_size, len(chunk), tuple(fields)))
            yield chunk

    store.iter_chunks = spy
    assert query(memory_client, "g", image_bytes(1), top_k=3).status_code == 200
    assert [n for _, n, _ in chunks] == [16, 16, 8]  # never the whole gallery at once
    assert {size for size, _, _ in chunks} == {engine.batch_size}
    # Only what scoring needs is read: the engine's gallery fields, not the conv5 maps.
    assert {fields for _, _, fields in chunks} == {tuple(engine.gallery_fields)}


def test_a_corrupt_cache_entry_is_skipped_not_fatal(client, engine):
    stored = build_gallery(client, 20)
    victim = stored[5]["image_id"]
    store = client.app.state.store
    field = engine.gallery_fields[0]
    if store.kind == "redis":  # bytes damaged in Redis itself
        store.client.hset(store._item_key("g", victim), f"b:{field}", b"\x00" * 7)
    else:
        gallery = store._galleries["g"]
        shard = gallery.shards[shard_of(victim, gallery.config.shards)]
        shard.entries[victim][1][field] = b"\x00" * 7
    r = query(client, "g", image_bytes(100 + 5), top_k=100)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scored"] == 19 and victim not in {x["image_id"] for x in body["results"]}
    m = metric_samples(client)
    assert m[("dsmi_gallery_items_skipped_total", ())] == 1


def test_query_filters_by_camera(client):
    stored = build_gallery(client, 12, cameras=("1", "2", "3"))
    cam = {s["image_id"]: s["camera_id"] for s in stored}
    probe = image_bytes(7)

    def cameras_of(**fields):
        body = query(client, "g", probe, top_k=100, **fields).json()
        assert body["scored"] == len(body["results"])
        return sorted({cam[x["image_id"]] for x in body["results"]}), body["scored"]

    assert cameras_of() == (["1", "2", "3"], 12)
    assert cameras_of(camera_id="1", exclude_same_camera="true") == (["2", "3"], 8)
    assert cameras_of(camera_id="1") == (["1", "2", "3"], 12)  # given, but not excluded
    assert cameras_of(cameras=["2"]) == (["2"], 4)
    assert cameras_of(cameras=["1", "3"], camera_id="3", exclude_same_camera="true") == (
        ["1"], 4)
    assert cameras_of(exclude_cameras=["2", "3"]) == (["1"], 4)
    assert cameras_of(cameras=["9"]) == ([], 0)


def test_query_of_an_emptied_gallery_is_empty(memory_client):
    stored = build_gallery(memory_client, 1)
    memory_client.delete(f"/v1/galleries/g/images/{stored[0]['image_id']}")
    body = query(memory_client, "g", image_bytes(1)).json()
    assert body["results"] == [] and body["gallery_size"] == 0


@pytest.mark.parametrize("fields", [{"top_k": 0}, {"top_k": 1001}, {"top_k": "many"},
                                    {"exclude_same_camera": "true"},
                                    {"exclude_same_camera": "maybe"}])
def test_query_validation(memory_client, fields):
    build_gallery(memory_client, 2)
    assert_error(query(memory_client, "g", image_bytes(1), **fields), 422, "validation_error")


def test_query_needs_an_image(memory_client):
    build_gallery(memory_client, 1)
    assert_error(memory_client.post("/v1/galleries/g/query", data={"top_k": 3}), 422)


# -- bad images ------------------------------------------------------------------------------

def truncated_jpeg() -> bytes:
    data = image_bytes(5, size=(64, 128))
    return data[:len(data) // 2]


def flat_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")  # a few kB
    return buf.getvalue()


def ico() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "ICO")
    return buf.getvalue()


BAD_IMAGES = {
    # name: (bytes, status, code)
    "text": (b"person,camera\n1,2\n", 400, "invalid_image"),
    "empty": (b"", 400, "invalid_image"),
    "truncated-jpeg": (truncated_jpeg(), 400, "invalid_image"),
    "pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n", 400,
            "invalid_image"),
    "ico": (ico(), 415, "unsupported_image_format"),
    "oversize-bytes": (image_bytes(6, size=(600, 600), fmt="PNG"), 413, "payload_too_large"),
    "too-many-pixels": (flat_png(1100, 1000), 413, "image_too_large"),  # limit: 1e6
    "decompression-bomb": (png_header_bomb(100_000, 100_000), 413, "image_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_a_bad_file_fails_the_whole_upload_and_is_named(client, name):
    data, status, code = BAD_IMAGES[name]
    upload(client, "g", [image_bytes(1)])  # the gallery exists with one image
    r = upload(client, "g", [image_bytes(2), data, image_bytes(3)],
               names=["good.jpg", f"{name}.bin", "also-good.jpg"])
    error = assert_error(r, status, code)
    assert f"{name}.bin" in error["message"] and "images[1]" in error["message"]
    assert error["details"] == {"index": 1, "filename": f"{name}.bin"}
    assert client.get("/v1/galleries/g/images").json()["total"] == 1  # nothing of it stored
    # A new gallery is not even created.
    assert_error(upload(client, "fresh", [image_bytes(2), data]), status, code)
    assert_error(client.get("/v1/galleries/fresh/images"), 404)


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_a_bad_probe_gets_its_status(memory_client, name):
    data, status, code = BAD_IMAGES[name]
    build_gallery(memory_client, 1)
    assert_error(query(memory_client, "g", data), status, code)


def test_request_body_over_the_limit_is_413(engine):
    app, _ = make_client(engine, "memory", max_upload_bytes=50_000)
    with TestClient(app) as c:
        images = [image_bytes(k, size=(100, 100), fmt="PNG") for k in range(2)]  # 30 kB each
        assert_error(upload(c, "g", images), 413, "payload_too_large")
        assert_error(query(c, "g", images[0] + images[1]), 413, "payload_too_large")

        def chunks():  # no Content-Length: the limit is enforced while reading
            yield b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x\"\r\n\r\n"
            for _ in range(10):
                yield b"\0" * 10_000
        r = c.post("/v1/galleries/g/images", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=b"})
        assert_error(r, 413, "payload_too_large")
        assert_error(c.get("/v1/galleries/g/images"), 404)


def exif_rotated_jpeg(raw: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def stored_maps(client, engine, image_id: str) -> np.ndarray:
    """What the store holds of an uploaded image, flattened: its gallery fields (the conv5
    map itself is not stored)."""
    blobs = client.app.state.store.get_blobs("g", image_id, list(engine.gallery_fields))
    assert set(blobs) == set(engine.gallery_fields)
    return np.concatenate([np.frombuffer(blobs[f], engine.cache_dtype)
                           for f in engine.gallery_fields])


def test_exif_rotation_is_applied_before_encoding(memory_client, engine):
    raw = np.random.default_rng(3).integers(0, 256, (96, 48, 3), dtype=np.uint8)
    jpeg = exif_rotated_jpeg(raw, orientation=6)  # display: rotate 90 degrees clockwise
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # pixels as stored

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue()

    rotated, unrotated = upload(memory_client, "g", [jpeg, png(np.rot90(decoded, k=-1))])\
        .json()["images"], upload(memory_client, "g", [png(decoded)]).json()["images"][0]
    exif_item, upright_item = rotated
    assert (exif_item["width"], exif_item["height"]) == (96, 48)  # upright size
    maps = stored_maps(memory_client, engine, exif_item["image_id"])
    np.testing.assert_allclose(maps, stored_maps(memory_client, engine,
                                                 upright_item["image_id"]), atol=1e-5)
    unrotated_maps = stored_maps(memory_client, engine, unrotated["image_id"])
    assert np.abs(maps - unrotated_maps).max() > 1e-3  # measured 8.5e-3; equal images: 1e-5


@pytest.mark.parametrize("make, size", [
    (lambda: image_bytes(1, mode="CMYK", fmt="JPEG"), (48, 96)),
    (lambda: image_bytes(2, mode="I;16", fmt="PNG"), (48, 96)),
    (lambda: image_bytes(3, mode="RGBA", fmt="PNG"), (48, 96)),
    (lambda: image_bytes(4, mode="L", fmt="JPEG"), (48, 96)),
    (lambda: image_bytes(5, fmt="GIF"), (48, 96)),
    (lambda: image_bytes(6, fmt="WEBP"), (48, 96)),
    (lambda: image_bytes(7, fmt="BMP"), (48, 96)),
    (lambda: image_bytes(8, size=(50, 40), fmt="TIFF"), (50, 40)),
], ids=["cmyk-jpeg", "16bit-png", "rgba-png", "grey-jpeg", "gif", "webp", "bmp", "tiff"])
def test_other_image_kinds_are_converted_and_stored(memory_client, engine, make, size):
    data = make()
    r = upload(memory_client, "g", [data])
    assert r.status_code == 201, r.text
    item = r.json()["images"][0]
    assert (item["width"], item["height"]) == size
    maps = stored_maps(memory_client, engine, item["image_id"])
    expected = engine.prepare_gallery(engine.encode(engine.preprocess(data)[None], "b"))
    np.testing.assert_allclose(maps, np.concatenate([expected[f].reshape(-1) for f in
                                                     engine.gallery_fields]), atol=1e-5)
    assert query(memory_client, "g", data).json()["results"][0]["score"] > 0.999


def test_rgba_transparency_is_filled_not_black(memory_client, engine):
    # A fully transparent image must encode as the normalisation mean, like any other
    # "no evidence" input, not as the black its RGB channels hold.
    buf = io.BytesIO()
    Image.new("RGBA", (48, 96), (0, 0, 0, 0)).save(buf, "PNG")
    black = io.BytesIO()
    Image.new("RGB", (48, 96), (0, 0, 0)).save(black, "PNG")
    items = upload(memory_client, "g", [buf.getvalue(), black.getvalue()]).json()["images"]
    transparent, opaque = (stored_maps(memory_client, engine, i["image_id"]) for i in items)
    assert np.abs(transparent - opaque).max() > 1e-3


# -- API keys ---------------------------------------------------------------------------------

def test_api_keys_guard_every_v1_route_but_not_health(engine):
    app, _ = make_client(engine, "memory", api_keys=["key-one-1", "key-two-2"])
    with TestClient(app) as c:
        guarded = [lambda h: c.get("/v1/galleries", headers=h),
                   lambda h: c.get("/v1/galleries/g/images", headers=h),
                   lambda h: c.delete("/v1/galleries/g", headers=h),
                   lambda h: c.post("/v1/galleries/g/images", headers=h,
                                    files=[("images", ("a.jpg", b"junk"))],
                                    data={"person_id": "1", "camera_id": "1"}),
                   lambda h: c.post("/v1/galleries/g/query", headers=h,
                                    files={"image": ("a.jpg", b"junk")})]
        for call in guarded:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                            {"Authorization": "Basic key-one-1"}, {"X-API-Key": ""}):
                r = call(headers)
                assert_error(r, 401, "unauthorized")
                assert r.headers["www-authenticate"].startswith("Bearer")
        headers_ok = [{"X-API-Key": "key-one-1"}, {"Authorization": "Bearer key-two-2"}]
        for headers in headers_ok:
            assert c.get("/v1/galleries", headers=headers).status_code == 200
        r = c.post("/v1/galleries/g/images", headers=headers_ok[0],
                   files=[("images", ("a.jpg", image_bytes(1)))],
                   data={"person_id": "1", "camera_id": "1"})
        assert r.status_code == 201
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert c.get(path).status_code == 200, path
        assert_error(c.get("/metrics"), 401)  # it names every gallery: a key's business
        assert c.get("/metrics", headers=headers_ok[0]).status_code == 200
        # Documented: the OpenAPI schema names both ways of sending a key.
        schemes = c.get("/openapi.json").json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}


# -- health, readiness, metrics, errors ---------------------------------------------------------

def test_readiness_reports_the_model_and_a_volatile_store(memory_client, engine):
    r = memory_client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["model_id"] == engine.model_id and body["store"] == "memory"
    assert body["persistent"] is False
    assert any("lost" in w and "DSMI_REDIS_URL" in w for w in body["warnings"])
    assert memory_client.get("/healthz").json() == {"status": "ok"}


def test_without_a_model_the_app_lives_but_is_not_ready(tmp_path):
    app = create_app(Settings(model_dir=tmp_path / "no-model"))
    with TestClient(app) as c:
        assert app.state.model_loaded.wait(30)
        assert c.get("/healthz").status_code == 200
        error = assert_error(c.get("/readyz"), 503, "not_ready")
        assert str(tmp_path / "no-model") in error["message"]
        assert error["details"]["checks"]["model"] != "ok"
        assert_error(c.get("/v1/galleries"), 503, "model_unavailable")
        assert_error(upload(c, "g", [image_bytes(1)]), 503)


def test_the_app_loads_its_model_from_the_settings(engine):
    app = create_app(Settings(model_dir=engine.model_dir, warmup=False))
    with TestClient(app) as c:
        assert app.state.model_loaded.wait(60)
        assert c.get("/readyz").json()["model_id"] == engine.model_id
        assert upload(c, "g", [image_bytes(1)]).status_code == 201


def test_head_threads_come_from_the_environment(engine, monkeypatch):
    from pydantic import ValidationError

    from service.app import load_engine

    monkeypatch.setenv("DSMI_HEAD_THREADS", "1")
    settings = Settings(model_dir=engine.model_dir, warmup=False, providers=["cpu"])
    assert load_engine(settings).head_threads == 1
    monkeypatch.setenv("DSMI_HEAD_THREADS", "0")
    with pytest.raises(ValidationError, match="head_threads"):
        Settings()


def test_a_store_of_another_model_is_refused(engine):
    from service.store import MemoryGalleryStore

    with pytest.raises(ValueError, match="must not be mixed"):
        create_app(Settings(), engine=engine, store=MemoryGalleryStore("another-model"))


def metric_samples(client) -> dict[tuple, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_requests_pairs_batches_and_gallery_sizes(memory_client, engine):
    build_gallery(memory_client, 20)
    query(memory_client, "g", image_bytes(1), top_k=3)
    query(memory_client, "nope", image_bytes(1))
    m = metric_samples(memory_client)
    upload_route = "/v1/galleries/{gallery}/images"
    query_route = "/v1/galleries/{gallery}/query"

    def labels(**kw):
        return tuple(sorted(kw.items()))

    assert m[("dsmi_http_requests_total", labels(method="POST", route=upload_route,
                                                 status="201"))] == 1
    assert m[("dsmi_http_requests_total", labels(method="POST", route=query_route,
                                                 status="200"))] == 1
    assert m[("dsmi_http_requests_total", labels(method="POST", route=query_route,
                                                 status="404"))] == 1
    assert m[("dsmi_http_request_duration_seconds_count",
              labels(method="POST", route=query_route, status="200"))] == 1
    assert m[("dsmi_pairs_scored_total", ())] == 20
    # The resident copy's 20 rows are one batch (the engine splits them among its threads).
    assert m[("dsmi_score_batch_duration_seconds_count", ())] == 1
    assert m[("dsmi_gallery_images", labels(gallery="g"))] == 20
    assert m[("dsmi_store_up", labels(store="memory"))] == 1
    assert m[("dsmi_model_info", labels(model_id=engine.model_id, variant=engine.variant,
                                        providers="CPUExecutionProvider"))] == 1


def test_unknown_routes_and_methods_get_the_error_shape(memory_client):
    assert_error(memory_client.get("/v2/nothing"), 404, "not_found")
    assert_error(memory_client.put("/v1/galleries/g/images"), 405, "method_not_allowed")
    m = metric_samples(memory_client)
    assert m[("dsmi_http_requests_total", (("method", "GET"), ("route", "unmatched"),
                                           ("status", "404")))] == 1


def test_openapi_documents_every_route(memory_client):
    schema = memory_client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/v1/galleries/{gallery}/images"]) == {"get", "post"}
    assert set(paths["/v1/galleries/{gallery}/images/{image_id}"]) == {"get", "delete"}
    assert set(paths["/v1/galleries/{gallery}"]) == {"get", "put", "delete"}
    assert set(paths["/v1/galleries/{gallery}/query"]) == {"post"}
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)
    post = paths["/v1/galleries/{gallery}/images"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert post["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse")
    assert memory_client.get("/docs").status_code == 200


def test_the_service_does_not_import_torch():
    code = ("import sys; import service.app, service.engine, dsmi_cli.serve, dsmi_cli.main; "
            "service.app.create_app(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not any(m == 'training' or m.startswith('training.') for m in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_docs_pages_load_their_assets_from_the_service(memory_client):
    """No CDN: every script and stylesheet the two pages name is served by the app."""
    import re as regex

    for page in ("/docs", "/redoc"):
        html = memory_client.get(page)
        assert html.status_code == 200
        urls = regex.findall(r'(?:src|href)="([^"]+)"', html.text)
        assets = [u for u in urls if u.endswith((".js", ".css"))]
        assert assets and all(u.startswith("/docs-assets/") for u in assets), urls
        assert "cdn" not in html.text.lower() and "fonts.googleapis" not in html.text
        for url in assets:
            r = memory_client.get(url)
            assert r.status_code == 200 and len(r.content) > 10_000, url


# -- thumbnails ----------------------------------------------------------------------------------

def test_each_upload_stores_a_small_thumbnail_served_by_its_route(client):
    big = image_bytes(7, size=(300, 600))
    wide = image_bytes(8, size=(200, 50), fmt="PNG")
    r = upload(client, "g", [big, wide])
    assert r.status_code == 201, r.text
    first, second = (x["image_id"] for x in r.json()["images"])
    shown = client.get(f"/v1/galleries/g/images/{first}/thumbnail")
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(shown.content))
    assert thumb.format == "JPEG" and thumb.size == (96, 192)  # 300x600 scaled, aspect kept
    # It looks like the upload: the mean colour of the scaled image.
    original = np.asarray(Image.open(io.BytesIO(big)).convert("RGB"), np.float32)
    assert np.abs(np.asarray(thumb, np.float32).mean((0, 1)) - original.mean((0, 1))).max() < 4
    assert len(shown.content) < 30_000
    thumb = Image.open(io.BytesIO(client.get(f"/v1/galleries/g/images/{second}/thumbnail")
                                  .content))
    assert thumb.size == (96, 24)
    assert_error(client.get(f"/v1/galleries/g/images/{'0' * 32}/thumbnail"), 404,
                 "image_not_found")
    assert_error(client.get(f"/v1/galleries/nope/images/{first}/thumbnail"), 404,
                 "gallery_not_found")
    assert_error(client.get("/v1/galleries/g/images/-xyz/thumbnail"), 422)
    # The thumbnail is not a tensor: queries and listings are as before.
    assert query(client, "g", big, top_k=1).json()["results"][0]["image_id"] == first
