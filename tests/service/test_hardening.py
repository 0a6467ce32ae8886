"""Hostile uploads: nothing that a client sends can poison a gallery. Every field is checked
and its stored form serialised before anything is written; a damaged stored entry is skipped
and reported, never fatal to the requests that read the gallery."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.store.base import LABEL_MAX, METADATA_MAX_DEPTH
from tests.service.test_api import assert_error, upload
from tests.service_support import image_bytes, make_client


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _sizes(client) -> dict[str, int]:
    return {g["name"]: g["size"] for g in client.get("/v1/galleries").json()["galleries"]}


@pytest.mark.parametrize("text", [_nested(METADATA_MAX_DEPTH + 1), _nested(256), _nested(950),
                                  _nested(20000), '{"x": NaN}', '{"x": [Infinity]}',
                                  '{"x": -Infinity}'])
def test_metadata_beyond_the_rules_is_422_and_nothing_is_stored(client, text):
    assert upload(client, "g", [image_bytes(1)]).status_code == 201
    r = upload(client, "g", [image_bytes(2)], metadata=text)
    error = assert_error(r, 422, "invalid_metadata")
    assert "nested" in error["message"] or "standard JSON" in error["message"]
    assert _sizes(client) == {"g": 1}
    listed = client.get("/v1/galleries/g/images").json()
    assert listed["total"] == 1 and listed["skipped"] == 0


def test_metadata_at_the_depth_limit_is_stored_and_read_back(client):
    text = _nested(METADATA_MAX_DEPTH)
    r = upload(client, "g", [image_bytes(1)], metadata=text)
    assert r.status_code == 201, r.text
    image_id = r.json()["images"][0]["image_id"]
    assert client.get(f"/v1/galleries/g/images/{image_id}").json()["metadata"] == json.loads(text)


@pytest.mark.parametrize("label", ["a\x00b", "left\u202eright", "tab\there", "\u200b",
                                   "x" * (LABEL_MAX + 1), "line\nbreak"])
@pytest.mark.parametrize("field", ["person_id", "camera_id"])
def test_ids_must_be_printable_and_short(client, field, label):
    fields = {"person_ids": [label]} if field == "person_id" else {"camera_ids": [label]}
    r = upload(client, "g", [image_bytes(1)], **fields)
    assert_error(r, 422)
    assert "g" not in _sizes(client)


def test_a_damaged_stored_entry_is_skipped_and_reported(client):
    ids = [upload(client, "g", [image_bytes(k)]).json()["images"][0]["image_id"]
           for k in range(3)]
    store = client.app.state.store
    if store.kind != "redis":
        pytest.skip("the in-process store holds checked objects, not bytes to damage")
    # Written behind the service's back: too deep to serve, then not JSON at all.
    store.client.hset(store._item_key("g", ids[1]), "meta",
                      json.dumps({"image_id": ids[1], "person_id": "p", "camera_id": "c",
                                  "metadata": json.loads(_nested(300))}))
    store.client.hset(store._item_key("g", ids[2]), "meta", b"\xff{not json")
    listed = client.get("/v1/galleries/g/images")
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [i["image_id"] for i in body["images"]] == ids[:1] and body["skipped"] == 2
    assert client.get(f"/v1/galleries/g/images/{ids[1]}").status_code == 404
    assert client.get(f"/v1/galleries/g/images/{ids[0]}").status_code == 200
    r = client.post("/v1/galleries/g/query",
                    files={"image": ("p.jpg", image_bytes(9), "application/octet-stream")})
    assert r.status_code == 200 and r.json()["scored"] == 1


# -- properties ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30)
labels = st.text(min_size=0, max_size=LABEL_MAX + 4)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(metadata=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
       person=labels, camera=labels)
def test_any_upload_is_stored_and_listable_or_refused_with_nothing_stored(
        client, metadata, person, camera):
    before = _sizes(client).get("h", 0)
    try:
        text = json.dumps(metadata)  # NaN and infinities become NaN/Infinity tokens
    except ValueError:
        return
    r = upload(client, "h", [image_bytes(3)], person_ids=[person], camera_ids=[camera],
               metadata=text)
    assert r.status_code < 500, r.text
    after = _sizes(client).get("h", 0)
    if r.status_code == 201:
        image_id = r.json()["images"][0]["image_id"]
        assert after == before + 1
        got = client.get(f"/v1/galleries/h/images/{image_id}")
        assert got.status_code == 200
        listed = client.get("/v1/galleries/h/images", params={"limit": 1000}).json()
        assert image_id in {i["image_id"] for i in listed["images"]} and listed["skipped"] == 0
        assert got.json()["person_id"] == person.strip()
    else:
        assert 400 <= r.status_code < 500 and after == before


# -- scoped keys ---------------------------------------------------------------------------------

KEYS = ["admin-key-0001", "reader-entrance:read:entrance",
        "site1-writer:read+write:site1-*", "lobby-writer:write:lobby"]


@pytest.fixture
def keyed(engine):
    app, _ = make_client(engine, "memory", api_keys=KEYS)
    with TestClient(app) as c:
        yield c


def _h(key: str) -> dict[str, str]:
    return {"X-API-Key": key.split(":")[0]}


def test_scoped_keys_reach_only_their_galleries_and_rights(keyed):
    admin, reader, site1, lobby = (_h(k) for k in KEYS)
    for gallery in ("entrance", "site1-a", "site1-b", "lobby"):
        assert upload(keyed, gallery, [image_bytes(1)], headers=admin).status_code == 201
    def names(headers):
        r = keyed.get("/v1/galleries", headers=headers)
        return [g["name"] for g in r.json()["galleries"]]

    assert names(admin) == ["entrance", "lobby", "site1-a", "site1-b"]
    assert names(reader) == ["entrance"] and names(site1) == ["site1-a", "site1-b"]
    assert_error(keyed.get("/v1/galleries", headers=lobby), 403)  # no read right
    # read: list and query its gallery, never write; nothing outside its scope
    assert keyed.get("/v1/galleries/entrance/images", headers=reader).status_code == 200
    r = keyed.post("/v1/galleries/entrance/query", headers=reader,
                   files={"image": ("p.jpg", image_bytes(2), "application/octet-stream")})
    assert r.status_code == 200
    assert_error(upload(keyed, "entrance", [image_bytes(3)], headers=reader), 403, "forbidden")
    assert_error(keyed.delete("/v1/galleries/entrance", headers=reader), 403, "forbidden")
    assert_error(keyed.get("/v1/galleries/site1-a/images", headers=reader), 403, "forbidden")
    # prefix scope: site1-* only
    assert upload(keyed, "site1-new", [image_bytes(4)], headers=site1).status_code == 201
    assert_error(upload(keyed, "site2", [image_bytes(4)], headers=site1), 403)
    assert keyed.delete("/v1/galleries/site1-b", headers=site1).status_code == 200
    # write without read: may upload and delete, not list or query
    assert upload(keyed, "lobby", [image_bytes(5)], headers=lobby).status_code == 201
    assert_error(keyed.get("/v1/galleries/lobby/images", headers=lobby), 403)
    # metrics: admin only
    for h in (reader, site1, lobby):
        assert_error(keyed.get("/metrics", headers=h), 403, "forbidden")
    m = keyed.get("/metrics", headers=admin)
    assert m.status_code == 200 and 'gallery="entrance"' in m.text


def test_a_refused_upload_reads_no_body_and_stores_nothing(keyed):
    admin, reader = _h(KEYS[0]), _h(KEYS[1])
    assert_error(upload(keyed, "entrance", [b"not even an image"], headers=reader), 403)
    assert keyed.get("/v1/galleries", headers=admin).json()["galleries"] == []


@pytest.mark.parametrize("entry", ["short", "key-with space:read:g", "k" * 10 + ":fly:g",
                                   "k" * 10 + ":read:", "k" * 10 + ":read:bad/name",
                                   "a:b", "k" * 10 + ":read:g:extra"])
def test_malformed_keys_fail_when_the_settings_load(entry):
    from pydantic import ValidationError

    from service.settings import Settings
    with pytest.raises(ValidationError):
        Settings(api_keys=[entry])


def test_keys_file_and_duplicate_keys(tmp_path):
    from pydantic import ValidationError

    from service.settings import Settings
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - key: file-key-0001\n    name: cams\n    rights: [read]\n"
                    "    galleries: [\"cam-*\"]\n")
    ring = Settings(api_keys_file=path).key_ring()
    key = ring.find("file-key-0001")
    assert key.name == "cams" and key.allows("read", "cam-3") and not key.allows("write")
    assert not key.allows("read", "other") and ring.find("file-key-0002") is None
    with pytest.raises(ValidationError, match="configured twice"):
        Settings(api_keys=["file-key-0001"], api_keys_file=path)
    path.write_text("keys:\n  - key: file-key-0001\n    rihgts: [read]\n")
    with pytest.raises(ValidationError, match="unknown fields"):
        Settings(api_keys_file=path)


def test_errors_name_no_address_and_redirects_echo_no_host(engine):
    app, _ = make_client(engine, "memory")
    with TestClient(app) as c:
        r = c.get("/v1/galleries/", headers={"Host": "evil.example"}, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers
        assert "evil.example" not in r.text


# -- overload -------------------------------------------------------------------------------------

def test_admission_refuses_past_the_bound_at_once_and_counts_kinds_apart():
    import asyncio

    from service.middleware import AdmissionMiddleware, work_kind

    assert work_kind("POST", "/v1/galleries/g/query") == "query"
    assert work_kind("POST", "/v1/galleries/g/images") == "upload"
    assert work_kind("GET", "/v1/galleries/g/images") is None

    release = asyncio.Event()
    refused = []

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = AdmissionMiddleware(slow_app, {"query": 2, "upload": 1}, on_refuse=refused.append)

    async def call(path):
        statuses, headers = [], {}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
                headers.update({k.decode(): v.decode() for k, v in message["headers"]})

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "POST", "path": path, "headers": [],
                 "client": ("10.0.0.1", 1234)}
        await app(scope, receive, send)
        return statuses[0], headers

    async def scenario():
        q = [asyncio.create_task(call("/v1/galleries/g/query")) for _ in range(2)]
        u = asyncio.create_task(call("/v1/galleries/g/images"))
        await asyncio.sleep(0.01)
        assert app.in_flight == {"query": 2, "upload": 1}
        status, headers = await asyncio.wait_for(call("/v1/galleries/g/query"), 1)
        assert status == 503 and headers["retry-after"] == "1"
        status, _ = await asyncio.wait_for(call("/v1/galleries/h/images"), 1)
        assert status == 503
        release.set()
        assert [(await t)[0] for t in (*q, u)] == [200, 200, 200]
        assert app.in_flight == {"query": 0, "upload": 0}
        assert (await call("/v1/galleries/g/query"))[0] == 200

    asyncio.run(scenario())
    assert refused == ["query", "upload"]


def test_an_overloaded_service_answers_503_with_the_error_shape(engine):
    app, _ = make_client(engine, "memory", max_inflight_queries=1)
    middleware = app.build_middleware_stack()
    with TestClient(app) as c:
        assert upload(c, "g", [image_bytes(1)]).status_code == 201
        # Hold the only query slot, as a query in flight would.
        node = middleware
        while not hasattr(node, "in_flight"):
            node = node.app
        node.by_client[("query", "addr:testclient")] = 1
        app.middleware_stack = middleware
        r = c.post("/v1/galleries/g/query",
                   files={"image": ("p.jpg", image_bytes(2), "application/octet-stream")})
        error = assert_error(r, 503, "overloaded")
        assert error["details"] == {"kind": "query", "limit": 1} and r.headers["retry-after"]
        assert c.get("/v1/galleries/g/images").status_code == 200  # reads are not bounded
        del node.by_client[("query", "addr:testclient")]
        r = c.post("/v1/galleries/g/query",
                   files={"image": ("p.jpg", image_bytes(2), "application/octet-stream")})
        assert r.status_code == 200
        assert 'dsmi_requests_refused_total{kind="query"} 1.0' in c.get("/metrics").text
