"""Checks made before a request body is read: the API key, the body size."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .deps import api_key_error
from .errors import error_response

__all__ = ["BodyLimitMiddleware", "ApiKeyMiddleware"]


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
    """Answers 401 to a request under ``prefix`` without a valid API key, before its body is
    read or validated (an unauthenticated client gets nothing parsed)."""

    def __init__(self, app: ASGIApp, keys: list[str], prefix: str = "/v1") -> None:
        self.app = app
        self.keys = list(keys)
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and self.keys
                and (path == self.prefix or path.startswith(self.prefix + "/"))):
            headers = Headers(scope=scope)
            error = api_key_error(headers.get("x-api-key"), headers.get("authorization"),
                                  self.keys)
            if error is not None:
                response = error_response(error.status, error.code, error.message,
                                          error.details, error.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
