"""Slow clients cannot hold the service's capacity: deadlines on a request's headers and body
over real sockets, and admission counted per client so that one cannot starve another."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from service.middleware import AdmissionMiddleware
from service.protocol import HeaderDeadlineH11Protocol
from tests.service_support import (
    ThreadedServer,
    dribble,
    dribble_body,
    image_bytes,
    make_client,
)


class FastDeadline(HeaderDeadlineH11Protocol):
    header_timeout = 1.0


def closed_within(sock: socket.socket, seconds: float, dribble: bytes = b"") -> float | None:
    """Send ``dribble`` a byte every 0.2 s until the server closes; the time it took."""
    started = time.monotonic()
    sock.settimeout(0.2)
    k = 0
    while time.monotonic() - started < seconds:
        if dribble:
            try:
                sock.send(dribble[k % len(dribble):k % len(dribble) + 1])
            except OSError:
                return time.monotonic() - started
            k += 1
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


@pytest.fixture
def server(engine):
    app, _ = make_client(engine, "memory", body_grace_seconds=1.0, body_min_rate=2000.0,
                         max_inflight_uploads=2)
    with ThreadedServer(app, http=FastDeadline) as running:
        yield running


def test_headers_sent_a_byte_at_a_time_or_never_get_the_connection_closed(server):
    idle = socket.create_connection(("127.0.0.1", server.port))
    dribbling = socket.create_connection(("127.0.0.1", server.port))
    dribbling.send(b"POST /v1/galleries/g/images HTTP/1.1\r\n")
    took = [closed_within(idle, 5.0), closed_within(dribbling, 5.0, b"X-Slow: yes\r\n")]
    assert all(t is not None and t < 3.0 for t in took), took
    # A normal request on its own connection is served meanwhile and after.
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def test_a_dribbled_body_is_a_408_and_frees_its_slot(server):
    slow = []
    for _ in range(2):  # both upload slots of this client
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.send(b"POST /v1/galleries/g/images HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\n")
        slow.append(sock)
    time.sleep(0.3)
    answers = []
    for sock in slow:
        sock.settimeout(0.25)
        deadline = time.monotonic() + 6
        answers.append(dribble(sock, lambda deadline=deadline: time.monotonic() < deadline,
                               lambda got: b"}}" in got))  # the whole JSON error
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    assert b"too slowly" in answers[0]
    files = [("images", ("a.jpg", image_bytes(1), "image/jpeg"))]
    r = httpx.post(f"{server.url}/v1/galleries/g/images", files=files,
                   data={"person_id": "p", "camera_id": "c"}, timeout=10)
    assert r.status_code == 201, r.text  # the slots were given back


def test_one_client_at_its_bound_does_not_take_another_clients_slots():
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = AdmissionMiddleware(slow_app, {"query": 1, "upload": 2}, total_factor=3)

    async def call(client=None, key=None):
        statuses = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/galleries/g/images",
                 "headers": [], "client": (client or "10.0.0.1", 1),
                 "state": {"api_key": key} if key else {}}
        await app(scope, receive, send)
        return statuses[0]

    class Key:
        def __init__(self, name):
            self.name = name

    async def scenario():
        held = [asyncio.create_task(call(key=Key("cameras"))) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert await asyncio.wait_for(call(key=Key("cameras")), 1) == 503  # its own bound
        other = [asyncio.create_task(call(key=Key("admin"))) for _ in range(2)]
        third = [asyncio.create_task(call(client="10.0.0.9"))]
        await asyncio.sleep(0.01)
        assert app.in_flight["upload"] == 5
        # The worker's bound (3 x 2) still caps everyone together.
        extra = asyncio.create_task(call(client="10.0.0.10"))
        await asyncio.sleep(0.01)
        assert await asyncio.wait_for(call(client="10.0.0.11"), 1) == 503
        release.set()
        assert [await t for t in (*held, *other, *third, extra)] == [200] * 6
        assert app.in_flight["upload"] == 0 and app.by_client == {}

    asyncio.run(scenario())


def test_slow_clients_leave_normal_clients_served(engine):
    """Six connections dribbling bodies (four uploads, two queries) from one address: a
    client from another address keeps being served, and the dribblers get 408s."""
    app, _ = make_client(engine, "memory", body_grace_seconds=1.0, body_min_rate=2000.0)
    with ThreadedServer(app, http=FastDeadline) as server:
        files = [("images", ("a.jpg", image_bytes(1), "image/jpeg"))]
        assert httpx.post(f"{server.url}/v1/galleries/g/images", files=files,
                          data={"person_id": "p", "camera_id": "c"}).status_code == 201
        stop = threading.Event()

        def dribble(path):
            dribble_body(server.port, path, stop, length=100_000)
        paths = ["/v1/galleries/g/images"] * 4 + ["/v1/galleries/g/query"] * 2
        threads = [threading.Thread(target=dribble, args=(p,), daemon=True) for p in paths]
        for t in threads:
            t.start()
        time.sleep(0.3)
        # httpx from 127.0.0.1 too: the same address as the dribblers. Their body deadline
        # frees the slots within seconds; a normal client retrying on 503 gets through.
        statuses = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            r = httpx.post(f"{server.url}/v1/galleries/g/query",
                           files={"image": ("p.jpg", image_bytes(2), "image/jpeg")})
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(0.3)
        stop.set()
        assert statuses[-1] == 200, statuses
