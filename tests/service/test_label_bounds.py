"""Metrics labels come from closed sets: invented methods and paths cannot grow /metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.service_support import make_client


@pytest.fixture
def memory_client(engine):
    app, _ = make_client(engine, "memory")
    with TestClient(app) as c:
        yield c


def _request_series(client) -> set[tuple]:
    text = client.get("/metrics").text
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "dsmi_http_requests")
    return {(s.labels["method"], s.labels["route"], s.labels["status"]) for s in family.samples
            if s.name.endswith("_total")}


def test_invented_methods_and_paths_fold_into_one_label_each(memory_client):
    for k in range(300):
        memory_client.request(f"M{k:07d}", "/healthz")
        memory_client.request("GET", f"/no/such/path/{k}")
        memory_client.request(f"X{k}", f"/v1/galleries/g{k}/images")
    series = _request_series(memory_client)
    methods = {m for m, _, _ in series}
    routes = {r for _, r, _ in series}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods and "unmatched" in routes
    assert not any("/no/such" in r or "g1" in r for r in routes)
    size = len(memory_client.get("/metrics").content)
    for k in range(300, 600):  # as many again: nothing new to label
        memory_client.request(f"M{k:07d}", "/healthz")
        memory_client.request("GET", f"/no/such/path/{k}")
    assert _request_series(memory_client) == series | {("GET", "/metrics", "200")}
    assert len(memory_client.get("/metrics").content) <= size + 2048
