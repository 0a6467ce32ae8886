"""Sharded galleries, idempotent uploads, retention and replica acknowledgement: the parts of
the store contract that issue 20 added, against the in-process store and a real Redis."""

from __future__ import annotations

import pytest

from service.domain import WriteNotReplicated
from service.store import GalleryItem, MemoryGalleryStore, NewItem, RedisGalleryStore
from service.store.base import Change, Generation, shard_of
from tests.service_support import REDIS_URL, delete_prefix, new_prefix, redis_client

DAY = 86400.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis", "cluster"])
def make_store(request):
    """``make_store(**settings)`` -> a store of this backend with a clock of its own
    (``store.clock``), in a fresh namespace."""
    made = []
    prefix = None
    url, cluster = REDIS_URL, False
    if request.param == "redis":
        redis_client()  # skips without Redis
        prefix = new_prefix()
    elif request.param == "cluster":
        url, cluster = request.getfixturevalue("redis_cluster").seed_url, True
        prefix = new_prefix()

    def make(**kwargs):
        kwargs.setdefault("clock", Clock())
        if prefix is None:
            store = MemoryGalleryStore("m", **kwargs)
        else:
            store = RedisGalleryStore(url, namespace="m", prefix=prefix, cluster=cluster,
                                      **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        if cluster:
            store.clear()
        store.close()
    if prefix is not None:
        delete_prefix(prefix)


def item(image_id: str, person: str = "p", blob: bytes = b"x" * 64,
         digest: str = "d0") -> NewItem:
    return NewItem(GalleryItem(image_id, person, "c1", {"person": person}), {"a": blob}, digest)


def named(n: int, start: int = 0, digest: str = "d0") -> list[NewItem]:
    return [item(f"img-{k:04d}", f"p{k % 7}", bytes([k % 256]) * 32, digest)
            for k in range(start, start + n)]


def ids(items) -> list[str]:
    return [x.item.image_id if isinstance(x, NewItem) else x.image_id for x in items]


# -- shards ----------------------------------------------------------------------------------

def test_a_sharded_gallery_spreads_its_items_and_reads_as_one(make_store):
    store = make_store(default_shards=3)
    first, second = named(40), named(20, start=40)
    assert store.add_items("g", first).size == 40
    store.clock.now += 0.001  # across shards, insertion order is the store clock's order
    assert store.add_items("g", second).size == 60
    assert store.gallery_config("g").shards == 3
    counts = [0, 0, 0]
    for image_id in ids(first + second):
        counts[shard_of(image_id, 3)] += 1
    assert min(counts) > 0  # every shard holds some
    total, listed = store.list_items("g", 0, 100)
    assert total == 60 and ids(listed) == ids(first + second)  # insertion order across shards
    pages = [ids(store.list_items("g", off, 7)[1]) for off in range(0, 63, 7)]
    assert sum(pages, []) == ids(first + second)
    scanned = [i for chunk in store.iter_chunks("g", ["a"], 8) for i, _ in chunk]
    assert sorted(ids(scanned)) == sorted(ids(first + second))
    fetched = store.fetch_items("g", ids(second)[::-1], ["a"])
    assert ids(i for i, _ in fetched) == ids(second)[::-1]


def test_a_sharded_gallery_logs_changes_per_shard(make_store):
    store = make_store(default_shards=3)
    store.add_items("g", named(9))
    start = store.generation("g")
    assert len(start.numbers) == 3 and start.number == sum(1 for n in start.numbers if n)
    doomed = ids(named(9))[4]
    store.delete_item("g", doomed)
    fresh = named(3, start=100)
    store.add_items("g", fresh)
    now, changes = store.changes_since("g", start)
    assert now == store.generation("g")
    removed = [c for c in changes if c.op == "remove"]
    assert removed == [Change(start.numbers[shard_of(doomed, 3)] + 1, "remove", (doomed,),
                              shard_of(doomed, 3))]
    added = sorted(i for c in changes if c.op == "add" for i in c.image_ids)
    assert added == sorted(ids(fresh))
    assert store.changes_since("g", now) == (now, [])
    # A reader holding another shard count (or epoch) reloads.
    assert store.changes_since("g", Generation(now.epoch, now.numbers[:2]))[1] is None


def test_gallery_settings_are_fixed_at_creation(make_store):
    store = make_store(default_shards=2, default_retention_days=30)
    config, created = store.create_gallery("g", shards=5, retention_days=1.5)
    assert created and (config.shards, config.retention_days) == (5, 1.5)
    again, created = store.create_gallery("g", shards=1)
    assert not created and again == config
    store.add_items("defaults", named(1))
    assert (store.gallery_config("defaults").shards,
            store.gallery_config("defaults").retention_days) == (2, 30)
    assert store.gallery_config("nope") is None
    for bad in (dict(shards=0), dict(shards=65), dict(retention_days=0),
                dict(retention_days=float("nan"))):
        with pytest.raises(ValueError):
            store.create_gallery("h", **bad)
    assert store.gallery_config("h") is None


# -- idempotent uploads -------------------------------------------------------------------------

def test_an_upload_retried_stores_nothing_twice(make_store):
    store = make_store(default_shards=3)
    batch = named(6)
    first = store.add_items("g", batch)
    assert ids(first.added) == ids(batch) and first.existing == []
    before = store.generation("g")
    retry = store.add_items("g", batch)
    assert retry.added == [] and ids(retry.existing) == ids(batch) and retry.size == 6
    assert [i.created_at for i in retry.existing] == [i.created_at for i in first.added]
    assert store.generation("g") == before  # nothing written, nothing logged
    mixed = store.add_items("g", batch[:2] + named(2, start=50))
    assert ids(mixed.existing) == ids(batch[:2]) and ids(mixed.added) == ids(named(2, start=50))
    assert store.gallery_size("g") == 8


def test_an_id_with_other_content_is_a_conflict_and_nothing_is_stored(make_store):
    store = make_store(default_shards=3)
    store.add_items("g", named(3))
    before = store.generation("g")
    other = [item("img-0001", digest="another")] + named(4, start=10)
    result = store.add_items("g", other)
    assert result.conflicts == ["img-0001"] and result.added == [] and result.size == 3
    assert store.generation("g") == before
    assert all(store.get_item("g", i) is None for i in ids(named(4, start=10)))
    assert store.get_blobs("g", "img-0001", ["a"]) == {"a": bytes([1]) * 32}


# -- retention ----------------------------------------------------------------------------------

def test_expired_items_leave_every_read_at_once_and_are_purged(make_store):
    store = make_store(default_shards=2)
    clock = store.clock
    store.create_gallery("g", retention_days=1)
    store.create_gallery("forever")
    old = named(5)
    store.add_items("g", old)
    store.add_items("forever", old)
    clock.now += DAY / 2
    young = named(3, start=20)
    store.add_items("g", young)
    clock.now += DAY / 2 - 1
    assert store.gallery_size("g") == 8
    clock.now += 2  # the first five are a day and a second old
    assert store.gallery_size("g") == 3 and store.list_galleries() == {"forever": 5, "g": 3}
    total, listed = store.list_items("g", 0, 10)
    assert total == 3 and ids(listed) == ids(young)
    gone = ids(old)[0]
    assert store.get_item("g", gone) is None and store.get_blobs("g", gone, ["a"]) is None
    assert store.fetch_items("g", [gone, ids(young)[0]], ["a"])[0][0].image_id == ids(young)[0]
    assert sorted(ids(i for c in store.iter_chunks("g", ["a"], 2) for i, _ in c)) == \
        sorted(ids(young))
    assert store.delete_item("g", gone) is False
    start = store.generation("g")
    assert store.purge_expired() == 5
    assert store.purge_expired() == 0
    now, changes = store.changes_since("g", start)
    assert sorted(i for c in changes for i in c.image_ids if c.op == "remove") == sorted(ids(old))
    assert store.gallery_size("forever") == 5  # no retention: untouched
    again = store.add_items("g", old[:1])  # an expired id may be stored again, as new
    assert ids(again.added) == ids(old[:1])


# -- replicas -------------------------------------------------------------------------------------

def test_a_write_no_replica_acknowledges_is_a_503_but_whole(make_store, request):
    if request.node.callspec.id != "redis":
        pytest.skip("replica acknowledgement is Redis's")
    plain = make_store()
    plain.create_gallery("g", shards=2)
    strict = make_store(min_replicas=1, wait_timeout_ms=50)  # the test Redis has no replica
    with pytest.raises(WriteNotReplicated, match="0 of 1 replica"):
        strict.add_items("g", named(4))
    assert plain.gallery_size("g") == 4  # applied whole on the master: a retry is a no-op...
    with pytest.raises(WriteNotReplicated):  # ... that still waits for the replicas
        strict.add_items("g", named(4))
    assert plain.gallery_size("g") == 4
    with pytest.raises(WriteNotReplicated):
        strict.delete_item("g", "img-0000")
    assert plain.gallery_size("g") == 3


def test_an_upload_succeeds_when_another_shard_cannot_be_counted(make_store, monkeypatch,
                                                                 request):
    """During a failover, a shard the upload did not touch may not answer: the upload is
    stored and says its gallery's size is unknown instead of failing."""
    import redis

    if request.node.callspec.id == "memory":
        pytest.skip("the in-process store always answers")
    store = make_store(default_shards=3)

    def dead_node(*args):
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(store, "_size", dead_node)
    result = store.add_items("g", named(3))
    assert result.size is None and len(result.added) == 3
    monkeypatch.undo()
    assert store.gallery_size("g") == 3


def test_a_wait_longer_than_the_socket_timeout_is_refused_when_configured():
    with pytest.raises(ValueError, match="below the socket timeout"):
        RedisGalleryStore(REDIS_URL, namespace="m", min_replicas=1, wait_timeout_ms=900,
                          socket_timeout=1.0)
    from service.settings import Settings

    with pytest.raises(ValueError, match="DSMI_REDIS_WAIT_TIMEOUT_MS"):
        Settings(redis_wait_timeout_ms=1000)
