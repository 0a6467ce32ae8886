"""Checks made before a request body is read: the API key, the body size, the load."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import KeyRing, gallery_path
from .deps import authorize
from .errors import error_response

__all__ = ["BodyLimitMiddleware", "ApiKeyMiddleware", "AdmissionMiddleware", "work_kind"]


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


class AdmissionMiddleware:
    """Bounds the queries and the uploads in flight, each kind on its own: past its bound a
    request is answered 503 ``overloaded`` with ``Retry-After`` at once, before its body is
    read, instead of waiting in a queue that only grows. Runs on the event loop, so the
    counts need no lock. ``on_refuse(kind)`` is called for each refused request."""

    def __init__(self, app: ASGIApp, limits: dict[str, int], retry_after: int = 1,
                 on_refuse=None) -> None:
        self.app = app
        self.limits = dict(limits)
        self.in_flight = {kind: 0 for kind in self.limits}
        self.retry_after = retry_after
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = work_kind(scope.get("method", ""), scope.get("path", "")) \
            if scope["type"] == "http" else None
        if kind is None or kind not in self.limits:
            await self.app(scope, receive, send)
            return
        if self.in_flight[kind] >= self.limits[kind]:
            if self.on_refuse is not None:
                self.on_refuse(kind)
            response = error_response(
                503, "overloaded", f"the service is at its limit of {self.limits[kind]} "
                f"{kind} requests in flight; retry after {self.retry_after} s",
                {"kind": kind, "limit": self.limits[kind]},
                {"Retry-After": str(self.retry_after)})
            await response(scope, receive, send)
            return
        self.in_flight[kind] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[kind] -= 1
