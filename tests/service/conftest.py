"""Fixtures of the service tests: the test engine and an in-process client per store."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.service_support import delete_prefix, make_client, service_engine


@pytest.fixture(scope="module")
def engine():
    """A randomly initialised dsmi-small, exported and loaded on the CPU (once a session)."""
    return service_engine()


@pytest.fixture(params=["memory", "redis"])
def client(request, engine):
    """The app on each store (Redis on a key prefix of its own, deleted afterwards)."""
    app, prefix = make_client(engine, request.param)
    with TestClient(app) as c:
        yield c
    if prefix:
        delete_prefix(prefix)
