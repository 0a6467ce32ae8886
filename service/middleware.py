"""Checks made around a request body: the API key (before it is read), its size and pace
(while it is read), the load (once it has arrived)."""

from __future__ import annotations

import asyncio
import tempfile

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import KeyRing, gallery_path
from .deps import authorize
from .errors import error_response

__all__ = ["BodyLimitMiddleware", "BodyDeadlineMiddleware", "ApiKeyMiddleware",
           "AdmissionMiddleware", "work_kind", "client_of"]


class BodyTooLarge(HTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class BodyLimitMiddleware:
    """Answers 413 when a request body exceeds ``max_bytes``: on the first read when its
    Content-Length says so (nothing is read), else as soon as the bytes read so far do.
    The error propagates out of the form parser to the app's 413 handler."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        try:
            declared_size = int(declared) if declared is not None else None
        except ValueError:
            declared_size = None
        limit = self.max_bytes
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if declared_size is not None and declared_size > limit:
                raise BodyTooLarge(f"request body of {declared_size} bytes; at most {limit} "
                                   "bytes per request")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"request body larger than {limit} bytes, the most "
                                       "allowed per request")
            return message

        await self.app(scope, receive_within_limit, send)


class RequestTimeout(HTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(status_code=408, detail=message, headers={"Connection": "close"})


class BodyDeadlineMiddleware:
    """Answers 408 when a request body arrives too slowly: after ``grace_s`` seconds, the
    body read so far must have come at ``min_rate`` bytes per second or more on average. A
    client dribbling bytes cannot hold the admission slot its request took (or a worker
    thread) for long; a slow but steady upload is not refused."""

    def __init__(self, app: ASGIApp, grace_s: float, min_rate: float) -> None:
        self.app = app
        self.grace_s, self.min_rate = float(grace_s), float(min_rate)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0

        async def receive_in_time() -> Message:
            nonlocal received
            deadline = started + self.grace_s + received / self.min_rate
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body came too slowly: {received} bytes in "
                    f"{loop.time() - started:.0f} s; after {self.grace_s:.0f} s at least "
                    f"{self.min_rate:.0f} bytes per second are expected") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        await self.app(scope, receive_in_time, send)


class ApiKeyMiddleware:
    """Answers 401 (no valid key) or 403 (a key without the right or the gallery) before a
    request's body is read or validated: an unauthorised client gets nothing parsed. The
    key that passed is left in ``request.state.api_key`` for the routes."""

    def __init__(self, app: ASGIApp, ring: KeyRing) -> None:
        self.app = app
        self.ring = ring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.ring:
            headers = Headers(scope=scope)
            key, error = authorize(self.ring, scope["method"], scope.get("path", ""),
                                   headers.get("x-api-key"), headers.get("authorization"))
            if error is not None:
                response = error_response(error.status, error.code, error.message,
                                          error.details, error.headers)
                await response(scope, receive, send)
                return
            if key is not None:
                scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


_WORK = {"/query": "query", "/images": "upload"}


def work_kind(method: str, path: str) -> str | None:
    """``"query"`` or ``"upload"`` for the two kinds of costly request, else ``None``."""
    parts = gallery_path(path)
    return _WORK.get(parts[1]) if method == "POST" and parts else None


def client_of(scope: Scope) -> str:
    """Who a request counts against: its API key's name when keys are on, else the client's
    address."""
    key = scope.get("state", {}).get("api_key")
    if key is not None:
        return f"key:{getattr(key, 'name', None) or id(key)}"
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


_SPOOL_IN_MEMORY = 1024 * 1024  # body bytes kept in memory per request; the rest on disk
_REPLAY_CHUNK = 64 * 1024


class AdmissionMiddleware:
    """Bounds the queries and the uploads in flight, each kind on its own and per client (API
    key, or address without keys), so that one client's requests cannot take every slot:
    past a client's bound, or the worker's (``total_factor`` times it), a request is answered
    503 ``overloaded`` with ``Retry-After`` instead of waiting in a queue that only grows.

    A request takes its slot only once its whole body has arrived: the body is first
    received (under the body size limit and deadline of the middlewares outside this one)
    into a spooled file (1 MiB in memory, the rest on disk, as the form parser would) and
    then replayed to the route. A client dribbling its body therefore never holds a slot,
    whoever else shares its address. Where the client's or the worker's bound is already
    reached when a request arrives, it is refused at once, before its body is read. Runs on
    the event loop, so the counts need no lock. ``on_refuse(kind)`` is called for each
    refused request."""

    def __init__(self, app: ASGIApp, limits: dict[str, int], retry_after: int = 1,
                 on_refuse=None, total_factor: int = 4) -> None:
        self.app = app
        self.limits = dict(limits)
        self.total_limits = {kind: limit * total_factor for kind, limit in self.limits.items()}
        self.in_flight = {kind: 0 for kind in self.limits}
        self.by_client: dict[tuple[str, str], int] = {}
        self.retry_after = retry_after
        self.on_refuse = on_refuse

    def _full(self, kind: str, slot: tuple[str, str]) -> tuple[str, int] | None:
        """(whose bound, the bound) when ``slot``'s client or the worker is at its bound."""
        if self.by_client.get(slot, 0) >= self.limits[kind]:
            return "this client's", self.limits[kind]
        if self.in_flight[kind] >= self.total_limits[kind]:
            return "the service's", self.total_limits[kind]
        return None

    async def _refuse(self, kind: str, full: tuple[str, int], scope: Scope, receive: Receive,
                      send: Send) -> None:
        if self.on_refuse is not None:
            self.on_refuse(kind)
        whose, limit = full
        response = error_response(
            503, "overloaded", f"{whose} limit of {limit} {kind} requests in flight is "
            f"reached; retry after {self.retry_after} s", {"kind": kind, "limit": limit},
            {"Retry-After": str(self.retry_after)})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = work_kind(scope.get("method", ""), scope.get("path", "")) \
            if scope["type"] == "http" else None
        if kind is None or kind not in self.limits:
            await self.app(scope, receive, send)
            return
        slot = (kind, client_of(scope))
        full = self._full(kind, slot)
        if full is not None:
            await self._refuse(kind, full, scope, receive, send)
            return
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as body:
            try:
                size = await _receive_body(receive, body)
            except HTTPException as exc:  # too large or too slow: said by the middlewares
                response = error_response(exc.status_code, _BODY_ERRORS.get(
                    exc.status_code, "bad_request"), str(exc.detail),
                    headers=getattr(exc, "headers", None))
                await response(scope, receive, send)
                return
            if size is None:
                return  # the client left before sending its body: nobody to answer
            full = self._full(kind, slot)  # others may have taken the slots meanwhile
            if full is not None:
                await self._refuse(kind, full, scope, receive, send)
                return
            self.in_flight[kind] += 1
            self.by_client[slot] = self.by_client.get(slot, 0) + 1
            try:
                await self.app(scope, _replay(body, size, receive), send)
            finally:
                self.in_flight[kind] -= 1
                left = self.by_client[slot] - 1
                if left:
                    self.by_client[slot] = left
                else:
                    del self.by_client[slot]  # no entry kept per client that has gone


_BODY_ERRORS = {413: "payload_too_large", 408: "request_timeout"}


async def _receive_body(receive: Receive, body) -> int | None:
    """Receive a request's whole body into ``body`` (left at its start) -> its size, or
    ``None`` when the client disconnected first."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body.write(message.get("body", b""))
        if not message.get("more_body", False):
            size = body.tell()
            body.seek(0)
            return size


def _replay(body, size: int, receive: Receive) -> Receive:
    """A ``receive`` that gives the spooled body of ``size`` bytes back in chunks, then the
    real channel (for a disconnect)."""
    left = size
    done = False

    async def replay() -> Message:
        nonlocal left, done
        if done:
            return await receive()
        chunk = body.read(_REPLAY_CHUNK)
        left -= len(chunk)
        done = left <= 0
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replay
