"""Real images through the real service: the 100 people of CUHK03's ``val`` split, camera 1 as
the gallery (uploaded through the API into Redis), camera 2 as probes. The service must rank
the true person first at least as often as the engine alone does on the same images with the
same model, and give the engine's scores."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app, store_namespace
from service.settings import Settings
from service.store import RedisGalleryStore
from tests.service_support import (
    REDIS_URL,
    delete_prefix,
    new_prefix,
    redis_client,
    service_engine,
)
from training.data import by_split, read_manifest

PEOPLE = 100


def first_per_person(records, camid: int) -> dict[int, object]:
    chosen = {}
    for r in sorted(records, key=lambda r: str(r.path)):
        if r.camid == camid:
            chosen.setdefault(r.pid, r)
    return chosen


@pytest.fixture(scope="module")
def cuhk03_pairs(data_dir):
    records = by_split(read_manifest(data_dir / "cuhk03-labeled.csv"), "val")
    gallery, probes = first_per_person(records, 1), first_per_person(records, 2)
    people = sorted(set(gallery) & set(probes))[:PEOPLE]
    assert len(people) == PEOPLE
    return [gallery[p] for p in people], [probes[p] for p in people]


def test_service_ranks_cuhk03_like_the_engine(cuhk03_pairs):
    redis_client()  # skips without Redis
    gallery, probes = cuhk03_pairs
    engine = service_engine()
    prefix = new_prefix()
    store = RedisGalleryStore(REDIS_URL, namespace=store_namespace(engine), prefix=prefix)
    try:
        with TestClient(create_app(Settings(), engine=engine, store=store)) as client:
            for start in range(0, PEOPLE, 25):
                part = gallery[start:start + 25]
                r = client.post("/v1/galleries/cuhk03-cam1/images",
                                files=[("images", (r.path.name, r.path.read_bytes()))
                                       for r in part],
                                data={"person_id": [str(r.pid) for r in part],
                                      "camera_id": [str(r.camid) for r in part]})
                assert r.status_code == 201, r.text
            service_top, service_scores = [], []
            for probe in probes:
                r = client.post("/v1/galleries/cuhk03-cam1/query",
                                files={"image": (probe.path.name, probe.path.read_bytes())},
                                data={"top_k": PEOPLE, "camera_id": "2",
                                      "exclude_same_camera": "true"})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["scored"] == PEOPLE
                service_top.append(int(body["results"][0]["person_id"]))
                by_person = {int(x["person_id"]): x["score"] for x in body["results"]}
                service_scores.append([by_person[g.pid] for g in gallery])
    finally:
        store.close()
        delete_prefix(prefix)

    # The engine alone: same model, same files, no service in between.
    gallery_side = engine.prepare_gallery(engine.encode(
        np.stack([engine.preprocess(g.path) for g in gallery]), "b"))
    engine_scores = np.stack([
        engine.score(engine.prepare_probe(engine.encode(engine.preprocess(p.path)[None], "a")),
                     [gallery_side]) for p in probes])
    truth = np.array([p.pid for p in probes])
    gallery_pids = np.array([g.pid for g in gallery])
    engine_hits = int((gallery_pids[engine_scores.argmax(1)] == truth).sum())
    service_hits = int((np.array(service_top) == truth).sum())
    print(f"rank-1 on {PEOPLE} CUHK03 val people: service {service_hits}, "
          f"engine {engine_hits}")
    assert service_hits >= engine_hits
    np.testing.assert_allclose(np.array(service_scores), engine_scores, atol=1e-5)
