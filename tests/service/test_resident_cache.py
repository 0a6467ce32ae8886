"""Resident galleries: a process's decoded copy of each gallery, kept coherent with the store
through its generation and change log, within a memory budget; and the queries ranked from it
(two-stage and exhaustive). The service-level tests run two apps on one Redis, as two service
processes would: nothing but Redis is shared between them."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.retrieval import two_stage_order
from service.app import create_app, store_namespace
from service.metrics import ServiceMetrics
from service.ranking import CameraFilter, GalleryRanker
from service.settings import Settings
from service.store import (
    GalleryItem,
    MemoryGalleryStore,
    NewItem,
    RedisGalleryStore,
    StoreUnavailable,
    new_image_id,
)
from service.store.codec import TensorCodec
from service.store.resident import ResidentCache, ResidentGallery
from tests.service_support import (
    REDIS_URL,
    delete_prefix,
    image_bytes,
    new_prefix,
    redis_client,
    service_engine,
)

CODEC = TensorCodec({"joint": (4,), "embedding": (3,)}, "float32",
                    required=("joint", "embedding"))


def items(n: int, seed: int = 0, camera: str = "1") -> list[NewItem]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        tensors = {"joint": rng.normal(size=4), "embedding": rng.normal(size=3)}
        out.append(NewItem(GalleryItem(new_image_id(), f"p{k}", camera), CODEC.encode(tensors)))
    return out


def live_ids(view) -> list[str]:
    return [view.items[r].image_id for r in np.flatnonzero(view.alive)]


def test_a_resident_gallery_follows_every_write_and_its_views_stay_as_taken():
    store = MemoryGalleryStore()
    first = items(5)
    store.add_items("g", first)
    resident = ResidentGallery("g", CODEC, "embedding")
    assert resident.sync(store).outcome == "reloaded"
    before = resident.view()
    assert resident.sync(store).outcome == "fresh"

    store.delete_item("g", first[1].item.image_id)
    later = items(2, seed=1)
    store.add_items("g", later)
    report = resident.sync(store)
    assert report.outcome == "replayed" and report.changes == 2
    after = resident.view()
    expected = [x.item.image_id for x in first[:1] + first[2:] + later]
    assert live_ids(after) == expected
    # The decoded tensors are the stored ones, and stage one's rows have unit length.
    row = after.items.index(next(i for i in after.items if i and i.image_id == expected[-1]))
    np.testing.assert_allclose(after.arrays["joint"][row],
                               CODEC.decode([later[-1].blobs])["joint"][0])
    np.testing.assert_allclose(np.linalg.norm(after.unit_embedding[after.alive], axis=1), 1,
                               rtol=1e-6)
    # The view taken before the writes still shows the gallery as it was.
    assert live_ids(before) == [x.item.image_id for x in first]

    store.delete_gallery("g")
    assert resident.sync(store).outcome == "reloaded"
    assert resident.view().size == 0


def test_replay_applies_changes_in_order():
    store = MemoryGalleryStore()
    store.add_items("g", items(1))
    resident = ResidentGallery("g", CODEC, "embedding")
    resident.sync(store)
    again = items(1, seed=3)
    store.add_items("g", again)
    store.delete_item("g", again[0].item.image_id)   # added then removed: never fetched
    readd = items(1, seed=4)
    store.add_items("g", readd)
    store.delete_item("g", readd[0].item.image_id)
    store.add_items("g", readd)                       # removed then added again: kept
    fetched = []
    fetch = store.fetch_items
    store.fetch_items = lambda g, ids, fields: fetched.extend(ids) or fetch(g, ids, fields)
    resident.sync(store)
    assert fetched == [readd[0].item.image_id]
    assert live_ids(resident.view())[-1] == readd[0].item.image_id
    assert resident.view().size == 2


def test_a_load_cut_short_by_the_store_is_done_again_not_replayed_onto():
    store = MemoryGalleryStore()
    store.add_items("g", items(10))
    resident = ResidentGallery("g", CODEC, "embedding")
    resident.sync(store)
    store.delete_gallery("g")  # another epoch: the next sync must reload
    added = items(2500, seed=1)  # three scan chunks
    store.add_items("g", added)
    scan = store.iter_chunks

    def failing(gallery, fields, size):
        chunks = scan(gallery, fields, size)
        yield next(chunks)
        raise StoreUnavailable("the store went away mid-scan")

    store.iter_chunks = failing
    with pytest.raises(StoreUnavailable):
        resident.sync(store)
    store.iter_chunks = scan
    assert resident.sync(store).outcome == "reloaded"
    assert live_ids(resident.view()) == [x.item.image_id for x in added]


def test_removed_rows_are_compacted_away():
    store = MemoryGalleryStore()
    added = items(1200)
    store.add_items("g", added)
    resident = ResidentGallery("g", CODEC, "embedding")
    resident.sync(store)
    for x in added[:400]:
        store.delete_item("g", x.item.image_id)
    resident.sync(store)
    view = resident.view()
    assert len(view.alive) == 800 and view.alive.all()
    assert live_ids(view) == [x.item.image_id for x in added[400:]]


def test_damaged_entries_are_skipped_when_loading():
    store = MemoryGalleryStore()
    good = items(3)
    bad = NewItem(GalleryItem(new_image_id(), "px", "1"), {"joint": b"\0" * 3,
                                                           "embedding": b"\0" * 12})
    store.add_items("g", good[:2] + [bad] + good[2:])
    resident = ResidentGallery("g", CODEC, "embedding")
    report = resident.sync(store)
    assert report.skipped == 1
    assert live_ids(resident.view()) == [x.item.image_id for x in good]


def test_the_cache_keeps_to_its_budget_least_recently_used_first():
    store = MemoryGalleryStore()
    for name in ("a", "b", "c"):
        store.add_items(name, items(50))
    probe = ResidentGallery("x", CODEC, "embedding")
    one = 64 * probe.item_bytes()  # a 50-item gallery's arrays grow to 64 rows
    cache = ResidentCache(CODEC, max_bytes=2 * one + 10, embedding_field="embedding")
    for name in ("a", "b", "a", "c"):
        view, _ = cache.view(store, name, size_hint=50)
        assert view is not None and view.size == 50
    assert set(cache._galleries) == {"a", "c"}  # b was the least recently used
    assert cache.nbytes <= cache.max_bytes
    store.add_items("big", items(200))
    view, report = cache.view(store, "big", size_hint=200)
    assert view is None and report.outcome == "bypassed" and "big" not in cache._galleries


def test_head_scores_follow_the_rows_given_consecutive_or_not():
    engine = service_engine()
    rng = np.random.default_rng(4)
    maps = np.maximum(rng.normal(size=(40, *engine.map_shape)), 0).astype(np.float32)
    prepared = engine.prepare_gallery(maps)
    store = MemoryGalleryStore()
    store.add_items("g", [NewItem(GalleryItem(new_image_id(), f"p{k}", "1"),
                                  engine.codec.encode({f: a[k] for f, a in prepared.items()}))
                          for k in range(40)])
    view, _ = ResidentCache(engine.codec, 1 << 30, "embedding").view(store, "g")
    probe = engine.prepare_probe(maps[:1])
    expected = engine.score(probe, {f: a[:40] for f, a in view.arrays.items()})
    # Consecutive (sliced), a shuffled run of consecutive rows (first and last 9 apart, but
    # not in order: gathered) and scattered rows (gathered).
    ranker = GalleryRanker(engine, store, ServiceMetrics())
    for rows in (np.arange(3, 33), np.array([3, 5, 4, 6, 7, 8, 9, 10, 11, 12]),
                 np.array([39, 0, 17, 2])):
        got = ranker._head_scores(view, probe, rows)
        np.testing.assert_allclose(got, expected[rows], atol=1e-6)


def test_rank_view_two_stage_and_exhaustive_agree_with_the_reference_order():
    engine = service_engine()
    rng = np.random.default_rng(0)
    n = 60
    maps = rng.normal(size=(n, *engine.map_shape)).astype(np.float32)
    prepared = engine.prepare_gallery(np.maximum(maps, 0))
    store = MemoryGalleryStore()
    store.add_items("g", [NewItem(GalleryItem(new_image_id(), f"p{k}", str(k % 3)),
                                  engine.codec.encode({f: a[k] for f, a in prepared.items()}))
                          for k in range(n)])
    cache = ResidentCache(engine.codec, 1 << 30, "embedding")
    view, _ = cache.view(store, "g")
    probe = engine.prepare_probe(np.maximum(rng.normal(size=(1, *engine.map_shape)), 0)
                                 .astype(np.float32))
    pair = engine.score(probe, prepared)
    emb = prepared["embedding"] / np.linalg.norm(prepared["embedding"], axis=1, keepdims=True)
    first = emb @ (probe["embedding"][0] / np.linalg.norm(probe["embedding"][0]))
    ranker = GalleryRanker(engine, store, ServiceMetrics())
    for rerank in (0, 5, 20, n):
        out = ranker.rank_view(view, probe, 10, CameraFilter(), rerank)
        # The service re-scores at least top_k items: a shorter shortlist would return
        # stage-one scores in the answer.
        order = two_stage_order(first, pair, max(rerank, 10) if rerank else n)[:10]
        assert [item.image_id for item, _ in out.ranked] == [view.items[k].image_id
                                                             for k in order]
        np.testing.assert_allclose([s for _, s in out.ranked], pair[order], atol=1e-6)
        assert out.rescored == (max(rerank, 10) if 0 < rerank < n else n)
    # Camera filters: only the kept cameras are ranked, in both modes.
    for rerank in (0, 5):
        out = ranker.rank_view(view, probe, 10, CameraFilter.of(["1"], ["2"]), rerank)
        assert out.scored == 20 and {item.camera_id for item, _ in out.ranked} == {"1"}


# -- two service processes on one Redis ------------------------------------------------------

@pytest.fixture
def two_apps():
    redis_client()  # skips without Redis
    engine = service_engine()
    prefix = new_prefix()
    apps = []
    for _ in range(3):
        store = RedisGalleryStore(REDIS_URL, namespace=store_namespace(engine), prefix=prefix)
        apps.append(create_app(Settings(rerank=5), engine=engine, store=store))
    yield apps
    for app in apps:
        app.state.store.close()
    delete_prefix(prefix)


def _upload(client, n: int, seed: int):
    files = [("images", (f"{k}.jpg", image_bytes(seed + k), "image/jpeg")) for k in range(n)]
    data = {"person_id": [f"p{seed + k}" for k in range(n)], "camera_id": ["1"] * n}
    r = client.post("/v1/galleries/g/images", files=files, data=data)
    assert r.status_code == 201, r.text
    return [x["image_id"] for x in r.json()["images"]]


def _query(client, seed: int, **fields):
    r = client.post("/v1/galleries/g/query",
                    files={"image": ("p.jpg", image_bytes(seed), "image/jpeg")},
                    data={"top_k": 50, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_write_through_one_process_is_seen_by_the_next_query_of_another(two_apps):
    a_app, b_app, c_app = two_apps
    with TestClient(a_app) as a, TestClient(b_app) as b:
        first = _upload(a, 12, seed=100)
        body = _query(b, 103)
        assert body["resident"] and body["gallery_size"] == 12
        assert body["results"][0]["image_id"] == first[3]
        assert b_app.state.cache.nbytes > 0

        # Upload through A: B's very next query ranks the new image (its exact copy first).
        more = _upload(a, 3, seed=500)
        body = _query(b, 501)
        assert body["results"][0]["image_id"] == more[1] and body["gallery_size"] == 15
        assert {x["image_id"] for x in body["results"]} == set(first + more)

        # B's metrics say what its syncs did.
        text = b.get("/metrics").text
        for outcome in ("reloaded", "replayed"):  # the first query loaded, the second replayed
            assert f'dsmi_gallery_cache_syncs_total{{outcome="{outcome}"}}' in text, outcome
        assert "dsmi_gallery_cache_bytes" in text

        # Delete through A: B stops returning it at once.
        assert a.delete(f"/v1/galleries/g/images/{more[1]}").status_code == 200
        body = _query(b, 501)
        assert more[1] not in {x["image_id"] for x in body["results"]}
        assert len(body["results"]) == 14

        # Exhaustive and two-stage from the resident copy, against the streamed answer.
        exhaustive = _query(b, 105, rerank=0)
        assert exhaustive["rerank"] == 0 and exhaustive["rescored"] == 14
        two_stage = _query(b, 105, rerank=5, top_k=3)
        assert (two_stage["rerank"], two_stage["rescored"], two_stage["scored"]) == (5, 5, 14)
        by_id = {x["image_id"]: x["score"] for x in exhaustive["results"]}
        for x in two_stage["results"]:  # the pair head's own scores for the shortlist
            assert x["score"] == pytest.approx(by_id[x["image_id"]], abs=1e-6)

        # A restarted process (a new app on the same Redis) rebuilds the gallery from Redis.
        with TestClient(c_app) as c:
            again = _query(c, 105, rerank=0)
        assert [x["image_id"] for x in again["results"]] == \
            [x["image_id"] for x in exhaustive["results"]]
        np.testing.assert_allclose([x["score"] for x in again["results"]],
                                   [x["score"] for x in exhaustive["results"]], atol=1e-6)

        # Deleting the gallery through A: B answers 404, and a new gallery of that name is
        # not mistaken for the old one.
        assert a.delete("/v1/galleries/g").status_code == 200
        r = b.post("/v1/galleries/g/query",
                   files={"image": ("p.jpg", image_bytes(1), "image/jpeg")})
        assert r.status_code == 404
        fresh = _upload(a, 2, seed=900)
        body = _query(b, 900)
        assert {x["image_id"] for x in body["results"]} == set(fresh)


# -- placed galleries (device-resident under CUDA; exercised here on the CPU) ----------------

def test_placed_galleries_are_placed_once_and_rank_like_the_host_path():
    from service.engine import Engine
    from tests.service_support import exported_model_dir

    engine = Engine(exported_model_dir(), providers=["CPUExecutionProvider"], batch_size=16,
                    place_galleries=True)
    assert engine.places_galleries and engine.device == "cpu"
    rng = np.random.default_rng(1)
    prepared = engine.prepare_gallery(np.maximum(rng.normal(size=(70, *engine.map_shape)), 0)
                                      .astype(np.float32))
    store = MemoryGalleryStore()
    added = [NewItem(GalleryItem(new_image_id(), f"p{k}", str(k % 2)),
                     engine.codec.encode({f: a[k] for f, a in prepared.items()}))
             for k in range(70)]
    store.add_items("g", added[:40])
    placed_rows = []
    place = engine.place

    def counting(arrays, start, stop):
        placed_rows.append((start, stop))
        return place(arrays, start, stop)

    engine.place = counting
    cache = ResidentCache(engine.codec, 1 << 30, "embedding")
    ranker = GalleryRanker(engine, store, ServiceMetrics(), cache)
    view, _ = cache.view(store, "g")
    assert placed_rows == [] and ranker.place_galleries  # the cache itself places nothing
    assert len(ranker._placed(view)) == 3 and placed_rows == [(0, 40)]  # chunks of 16
    store.add_items("g", added[40:60])
    store.delete_item("g", added[3].item.image_id)
    view, _ = cache.view(store, "g")
    ranker._placed(view)
    # Within the arrays' capacity (64 rows): only from the last partial chunk on.
    assert placed_rows[-1] == (32, 60)
    store.add_items("g", added[60:])
    view, _ = cache.view(store, "g")
    ranker._placed(view)
    assert placed_rows[-1] == (0, 70)  # the arrays grew (new arrays): placed again
    view, _ = cache.view(store, "g")
    ranker._placed(view)
    assert len(placed_rows) == 3  # nothing changed, nothing placed
    assert len(ranker._placements) == 1  # the replaced arrays' placement is gone with them
    probe = engine.prepare_probe(np.maximum(rng.normal(size=(1, *engine.map_shape)), 0)
                                 .astype(np.float32))
    host = GalleryRanker(engine, store, ServiceMetrics(), cache)
    host.place_galleries = False
    for cameras in (CameraFilter(), CameraFilter.of(["1"])):
        on_device = ranker.rank_view(view, probe, 20, cameras, 0)
        on_host = host.rank_view(view, probe, 20, cameras, 0)
        assert [i.image_id for i, _ in on_device.ranked] == [i.image_id for i, _ in
                                                             on_host.ranked]
        np.testing.assert_allclose([s for _, s in on_device.ranked],
                                   [s for _, s in on_host.ranked], atol=1e-6)
        assert added[3].item.image_id not in {i.image_id for i, _ in on_device.ranked}


def test_a_query_recounts_only_its_own_gallery_and_the_total_stays_exact(monkeypatch):
    store = MemoryGalleryStore()
    for g in range(40):
        store.add_items(f"g{g}", items(3, seed=g))
    cache = ResidentCache(CODEC, max_bytes=10**9, embedding_field="embedding")
    for g in range(40):
        cache.view(store, f"g{g}")
    assert cache.nbytes == sum(r.nbytes for r in cache._galleries.values())
    counted = []
    original = ResidentGallery.nbytes

    def counting(self):
        counted.append(self.name)
        return original.fget(self)
    monkeypatch.setattr(ResidentGallery, "nbytes", property(counting))
    store.add_items("g7", items(2, seed=99))
    cache.view(store, "g7")
    assert set(counted) == {"g7"}  # one gallery counted, not forty
    monkeypatch.setattr(ResidentGallery, "nbytes", original)
    assert cache.nbytes == sum(r.nbytes for r in cache._galleries.values())
    cache.drop("g3")
    assert cache.nbytes == sum(r.nbytes for r in cache._galleries.values())


def test_eviction_by_the_running_total_is_least_recently_queried_first():
    store = MemoryGalleryStore()
    for g in range(4):
        store.add_items(f"g{g}", items(3, seed=g))
    one = ResidentCache(CODEC, max_bytes=10**9, embedding_field="embedding")
    one.view(store, "g0")
    budget = int(2.5 * one.nbytes)  # room for two galleries, not three
    cache = ResidentCache(CODEC, max_bytes=budget, embedding_field="embedding")
    for g in (0, 1, 0, 2):
        cache.view(store, f"g{g}")
    assert list(cache._galleries) == ["g0", "g2"]  # g1 was the least recently queried
    assert cache.nbytes <= budget
    assert cache.nbytes == sum(r.nbytes for r in cache._galleries.values())
