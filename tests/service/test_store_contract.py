"""The gallery store contract, run against both stores: the in-process one and Redis (a real
server, on a key prefix of its own that the test deletes afterwards)."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from service.store import (
    Change,
    GalleryItem,
    GalleryStore,
    Generation,
    MemoryGalleryStore,
    NewItem,
    RedisGalleryStore,
    StoreUnavailable,
    new_image_id,
)
from tests.service_support import REDIS_URL, delete_prefix, new_prefix, redis_client

BLOB = bytes(range(256)) * 3  # every byte value, \0 \r \n included


@pytest.fixture
def redis_prefix():
    redis_client()  # skips when there is no Redis
    prefix = new_prefix()
    yield prefix
    delete_prefix(prefix)


@pytest.fixture(params=["memory", "redis", "cluster"])
def make_store(request):
    """Stores of one backend: ``make_store(namespace)``; Redis ones share one test prefix
    (on the single Redis, or on the session's Redis Cluster of 3 masters + 3 replicas)."""
    made: list[GalleryStore] = []
    backing = None
    if request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        url, cluster = REDIS_URL, False
    elif request.param == "cluster":
        prefix = new_prefix()
        url, cluster = request.getfixturevalue("redis_cluster").seed_url, True
    else:
        backing = {}

    def make(namespace: str = "model-a") -> GalleryStore:
        if backing is None:
            store = RedisGalleryStore(url, namespace=namespace, prefix=prefix, cluster=cluster)
        else:  # in-process stores of one namespace share nothing but the namespace name
            store = backing.setdefault(namespace, MemoryGalleryStore(namespace))
        made.append(store)
        return store

    yield make
    for store in made:
        if request.param == "cluster":
            store.clear()
        store.close()


@pytest.fixture
def store(make_store) -> GalleryStore:
    return make_store()


def new_items(n: int, person: str = "p", camera: str = "1", tag: int = 0) -> list[NewItem]:
    return [NewItem(GalleryItem(new_image_id(), f"{person}{k}", camera, {"k": k, "tag": tag},
                                filename=f"img{k}.jpg", width=64, height=128),
                    {"a": BLOB + bytes([k]), "b": b"b" * (k + 1)}) for k in range(n)]


def described(items) -> list[GalleryItem]:
    """Items as stored, less the time the store stamped them with."""
    return [dataclasses.replace(x.item if isinstance(x, NewItem) else x, created_at=0)
            for x in items]


def ids(items) -> list[str]:
    return [x.item.image_id if isinstance(x, NewItem) else x.image_id for x in items]


def test_store_satisfies_the_protocol(store):
    assert isinstance(store, GalleryStore)
    store.ping()


def test_add_then_read_back_everything(store):
    items = new_items(3)
    assert store.add_items("g", items).size == 3
    assert store.gallery_size("g") == 3
    assert store.list_galleries() == {"g": 3}
    total, listed = store.list_items("g", 0, 10)
    assert total == 3 and described(listed) == described(items)
    assert described([store.get_item("g", items[1].item.image_id)]) == described(items[1:2])
    assert store.get_blobs("g", items[2].item.image_id, ["a", "b", "missing"]) == {
        "a": BLOB + b"\x02", "b": b"bbb"}


def test_listing_is_paginated_in_insertion_order(store):
    first, second = new_items(4), new_items(3, person="q")
    store.add_items("g", first)
    store.add_items("g", second)
    everything = ids(first) + ids(second)
    pages = [store.list_items("g", offset, 3) for offset in (0, 3, 6, 9)]
    assert [p[0] for p in pages] == [7, 7, 7, 7]
    assert sum((ids(p[1]) for p in pages), []) == everything
    assert pages[-1][1] == []


def test_unknown_gallery_is_none_everywhere(store):
    store.add_items("other", new_items(1))
    assert store.gallery_size("nope") is None
    assert store.list_items("nope", 0, 10) is None
    assert store.get_item("nope", new_image_id()) is None
    assert store.get_blobs("nope", new_image_id(), ["a"]) is None
    assert store.delete_item("nope", new_image_id()) is False
    assert store.delete_gallery("nope") is None
    assert list(store.iter_chunks("nope", ["a"], 4)) == []


def test_an_item_belongs_to_its_gallery_only(store):
    items = new_items(1)
    store.add_items("g1", items)
    store.add_items("g2", new_items(1))
    assert store.get_item("g2", items[0].item.image_id) is None
    assert store.delete_item("g2", items[0].item.image_id) is False
    assert store.gallery_size("g1") == 1


def test_delete_item_keeps_the_gallery(store):
    items = new_items(2)
    store.add_items("g", items)
    assert store.delete_item("g", items[0].item.image_id) is True
    assert store.delete_item("g", items[0].item.image_id) is False
    assert store.get_item("g", items[0].item.image_id) is None
    assert store.gallery_size("g") == 1
    assert store.delete_item("g", items[1].item.image_id) is True
    assert store.gallery_size("g") == 0          # empty, but still there
    assert store.list_galleries() == {"g": 0}


def test_delete_gallery_removes_its_items_and_only_them(store):
    doomed, kept = new_items(5), new_items(2)
    store.add_items("doomed", doomed)
    store.add_items("kept", kept)
    assert store.delete_gallery("doomed") == 5
    assert store.gallery_size("doomed") is None
    assert all(store.get_item("doomed", i) is None for i in ids(doomed))
    assert store.delete_gallery("doomed") is None
    assert store.list_galleries() == {"kept": 2}
    assert ids(store.list_items("kept", 0, 10)[1]) == ids(kept)
    fresh = new_items(1)
    assert store.add_items("doomed", fresh).size == 1  # the name can be used again, empty
    assert ids(store.list_items("doomed", 0, 10)[1]) == ids(fresh)


def test_iter_chunks_walks_the_gallery_in_order_and_in_bounded_chunks(store):
    first, second = new_items(6), new_items(4, person="q")
    store.add_items("g", first)
    store.add_items("g", second)
    chunks = list(store.iter_chunks("g", ["a"], 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    flat = [entry for chunk in chunks for entry in chunk]
    assert ids(item for item, _ in flat) == ids(first) + ids(second)
    assert all(set(blobs) == {"a"} for _, blobs in flat)  # only the fields asked for
    assert flat[3][1]["a"] == BLOB + b"\x03"


def test_iter_chunks_leaves_out_items_deleted_during_the_scan(store):
    items = new_items(6)
    store.add_items("g", items)
    scan = store.iter_chunks("g", ["b"], 2)
    first = next(scan)
    store.delete_item("g", items[4].item.image_id)
    rest = [item for chunk in scan for item, _ in chunk]
    assert ids(item for item, _ in first) + ids(rest) == ids(items[:4] + items[5:])


def test_upload_is_all_or_nothing(store):
    items = new_items(3)
    broken = NewItem(items[2].item, {"a": "not bytes"})
    with pytest.raises(TypeError, match="not str"):
        store.add_items("g", [items[0], items[1], broken])
    assert store.gallery_size("g") is None
    assert store.get_item("g", items[0].item.image_id) is None


def test_concurrent_uploads_lose_nothing(store):
    batches = [new_items(5, person=f"t{t}-") for t in range(20)]
    barrier = threading.Barrier(len(batches))
    errors = []

    def upload(batch):
        try:
            barrier.wait()
            store.add_items("g", batch)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    total, listed = store.list_items("g", 0, 1000)
    assert total == 100
    assert sorted(ids(listed)) == sorted(i for b in batches for i in ids(b))
    order = ids(listed)  # each upload's items stay in order (and together, unsharded)
    for batch in batches:
        places = [order.index(i) for i in ids(batch)]
        assert places == sorted(places)
        if store.gallery_config("g").shards == 1:
            assert places == list(range(places[0], places[0] + 5))


def test_namespaces_never_mix(make_store):
    model_a, model_b = make_store("model-a"), make_store("model-b")
    items = new_items(2)
    model_a.add_items("g", items)
    assert model_b.gallery_size("g") is None
    assert model_b.get_item("g", items[0].item.image_id) is None
    model_b.add_items("g", new_items(1))
    model_b.clear()
    assert model_b.list_galleries() == {}
    assert described(model_a.list_items("g", 0, 10)[1]) == described(items)


def test_clear_empties_the_namespace(store):
    store.add_items("g1", new_items(2))
    store.add_items("g2", new_items(2))
    store.clear()
    assert store.list_galleries() == {}
    assert store.gallery_size("g1") is None


def test_redis_store_keeps_to_its_prefix(redis_prefix):
    store = RedisGalleryStore(REDIS_URL, namespace="m", prefix=redis_prefix)
    store.add_items("g", new_items(3))
    store.delete_gallery("g")
    client = redis_client()
    before = {k for k in client.scan_iter(match=redis_prefix + "*")}
    assert before == set()  # nothing left behind, no global key either
    outsider = f"{redis_prefix}other:key"
    client.set(outsider, b"x")
    store.add_items("g", new_items(1))
    store.clear()
    assert client.get(outsider) == b"x"  # another namespace under the same prefix: untouched
    client.close()
    store.close()


def test_unreachable_redis_raises_store_unavailable():
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = RedisGalleryStore(f"redis://127.0.0.1:{port}/0", namespace="m", prefix="dsmi-test-x:")
    for call in (store.ping, lambda: store.add_items("g", new_items(1)),
                 lambda: store.gallery_size("g"), lambda: list(store.iter_chunks("g", ["a"], 2)),
                 lambda: store.list_items("g", 0, 5), lambda: store.delete_gallery("g")):
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
            call()


def test_redis_password_never_appears_in_errors():
    store = RedisGalleryStore("redis://user:s3cret@127.0.0.1:1/0", namespace="m",
                              prefix="dsmi-test-x:")
    with pytest.raises(StoreUnavailable) as info:
        store.ping()
    assert "s3cret" not in str(info.value)


def test_a_damaged_redis_entry_is_left_out(redis_prefix):
    store = RedisGalleryStore(REDIS_URL, namespace="m", prefix=redis_prefix)
    items = new_items(3)
    store.add_items("g", items)
    store.client.hset(store._item_key("g", items[1].item.image_id), "meta", b"{not json")
    assert ids(store.list_items("g", 0, 10)[1]) == ids([items[0], items[2]])
    assert store.get_item("g", items[1].item.image_id) is None
    scanned = [item for chunk in store.iter_chunks("g", ["a"], 2) for item, _ in chunk]
    assert ids(scanned) == ids([items[0], items[2]])
    store.close()


# -- generations and change logs (what resident galleries replay) ---------------------------

def test_every_write_advances_the_generation_and_logs_what_changed(store):
    assert store.generation("g") == Generation("")
    first = new_items(3)
    store.add_items("g", first)
    g1 = store.generation("g")
    assert g1.number == 1 and g1.epoch
    store.delete_item("g", ids(first)[1])
    second = new_items(2, tag=1)
    store.add_items("g", second)
    now, changes = store.changes_since("g", g1)
    assert now == store.generation("g") and now.number == 3 and now.epoch == g1.epoch
    assert changes == [Change(2, "remove", (ids(first)[1],), 0),
                       Change(3, "add", tuple(ids(second)), 0)]
    assert store.changes_since("g", now) == (now, [])


def test_writes_that_change_nothing_leave_the_generation_alone(store):
    store.add_items("g", new_items(1))
    before = store.generation("g")
    assert not store.delete_item("g", new_image_id())
    assert not store.delete_item("nope", new_image_id())
    store.add_items("g", [])
    assert store.generation("g") == before
    assert store.generation("nope") == Generation("")


def test_a_deleted_gallery_cannot_be_replayed_and_a_new_one_has_a_new_epoch(store):
    store.add_items("g", new_items(2))
    old = store.generation("g")
    store.delete_gallery("g")
    assert store.generation("g") == Generation("")
    assert store.changes_since("g", old)[1] is None
    store.add_items("g", new_items(2))
    store.add_items("g", new_items(1))
    now, changes = store.changes_since("g", old)
    # Same number of writes as before the deletion, but another epoch: never mistaken.
    assert now.number == 2 and now.epoch != old.epoch and changes is None


def test_fetch_items_returns_the_asked_items_in_order_and_leaves_out_the_rest(store):
    added = new_items(4)
    store.add_items("g", added)
    store.add_items("h", new_items(1))
    store.delete_item("g", ids(added)[2])
    wanted = [ids(added)[3], new_image_id(), ids(added)[0], ids(added)[2]]
    chunk = store.fetch_items("g", wanted, ["a"])
    assert [item.image_id for item, _ in chunk] == [ids(added)[3], ids(added)[0]]
    assert chunk[0][1] == {"a": BLOB + bytes([3])}
    assert described([chunk[0][0]]) == described(added[3:4])
    assert store.fetch_items("h", ids(added)[:1], ["a"]) == []  # another gallery's item
    assert store.fetch_items("g", [], ["a"]) == []


def test_redis_replay_gives_up_when_the_log_was_trimmed(redis_prefix):
    store = RedisGalleryStore(REDIS_URL, namespace="m", prefix=redis_prefix)
    store.add_items("g", new_items(1))
    start = store.generation("g")
    for k in range(3):
        store.add_items("g", new_items(1, tag=k))
    assert len(store.changes_since("g", start)[1]) == 3
    log_key = store._layout("g")[1][0].log
    store.client.xtrim(log_key, maxlen=1, approximate=False)  # as the cap would
    now, changes = store.changes_since("g", start)
    assert now.number == 4 and changes is None
    _, last = store.changes_since("g", Generation(start.epoch, (3,)))  # still in the log
    assert [c.number for c in last] == [4]


def test_redis_deleting_unknown_names_creates_no_keys(redis_prefix):
    store = RedisGalleryStore(REDIS_URL, namespace="m", prefix=redis_prefix)
    for k in range(5):
        store.delete_item(f"g{k}", new_image_id())
        store.delete_gallery(f"h{k}")
    assert list(store.client.scan_iter(match=redis_prefix + "*")) == []


def test_redis_a_deletion_cut_short_is_finished_at_the_next_start(redis_prefix, monkeypatch):
    store = RedisGalleryStore(REDIS_URL, namespace="m:[x]", prefix=redis_prefix)
    store.add_items("doomed:gallery", new_items(7))

    def stop(marker, config, shards):  # the process dies between the two steps
        raise KeyboardInterrupt
    monkeypatch.setattr(store, "_drain", stop)
    with pytest.raises(KeyboardInterrupt):
        store.delete_gallery("doomed:gallery")
    assert store.gallery_size("doomed:gallery") is None  # gone for readers at once
    left = list(store.client.scan_iter(match=redis_prefix + "*"))
    doomed_items = [k for k in left if b"{doomed:gallery/" in k and b":i:" in k]
    assert any(b":deleting:" in k for k in left) and len(doomed_items) == 7
    store.add_items("doomed:gallery", new_items(3))  # a new gallery of the same name meanwhile

    restarted = RedisGalleryStore(REDIS_URL, namespace="m:[x]", prefix=redis_prefix)
    assert restarted.finish_deletions() == 1
    left = list(restarted.client.scan_iter(match=redis_prefix + "*"))
    assert not any(b":deleting:" in k for k in left)
    assert len([k for k in left if b"{doomed:gallery/" in k and b":i:" in k]) == 3
    assert restarted.gallery_size("doomed:gallery") == 3
    assert restarted.finish_deletions() == 0


def test_redis_the_service_finishes_interrupted_deletions_when_it_starts(redis_prefix,
                                                                         monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app, store_namespace
    from service.settings import Settings
    from tests.service_support import service_engine

    engine = service_engine()
    store = RedisGalleryStore(REDIS_URL, namespace=store_namespace(engine), prefix=redis_prefix)
    store.add_items("g", new_items(4))
    monkeypatch.setattr(store, "_drain", lambda *args: None)  # stopped before draining
    store.delete_gallery("g")
    monkeypatch.undo()
    assert any(b":deleting:" in k for k in store.client.scan_iter(match=redis_prefix + "*"))
    with TestClient(create_app(Settings(), engine=engine, store=store)) as client:
        assert client.get("/readyz").status_code == 200
    left = list(store.client.scan_iter(match=redis_prefix + "*"))
    assert not any(b":deleting:" in k or b":i:" in k for k in left)


def test_redis_a_gallery_missing_from_the_registry_is_listed_again_at_start(redis_prefix):
    store = RedisGalleryStore(REDIS_URL, namespace="m", prefix=redis_prefix)
    store.add_items("g1", new_items(2))
    store.add_items("g2", new_items(1))
    # A process stopped between creating g2 and registering it: listings miss it...
    store.client.srem(store._registry_key(), "g2")
    assert store.list_galleries() == {"g1": 2} and store.gallery_size("g2") == 1
    # ... until the next start repairs the registry from the galleries' own keys.
    store.finish_deletions()
    assert store.list_galleries() == {"g1": 2, "g2": 1}
    store.close()
