"""One JSON shape for every error, and the handlers that produce it.

``{"error": {"code": "...", "message": "...", "details": ...}}``. Client mistakes get a 4xx
with a message saying what to fix; an unreachable store a 503; nothing a client sends may
cause a 500. The request errors of :mod:`service.domain`, raised without HTTP by the ranker,
the upload path and the store, get their status here alone (:func:`domain_status`).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .domain import (
    DomainError,
    GalleryConflict,
    GalleryNotFound,
    ImageConflict,
    ImageNotFound,
    ImageRefused,
    Overloaded,
    RequestInvalid,
    RequestTooLarge,
    WriteNotReplicated,
)
from .store import InvalidItem, StoreUnavailable

__all__ = ["ServiceError", "error_response", "domain_status", "install_error_handlers"]

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with its HTTP status, a stable machine-readable code and a message."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


# The HTTP status of each domain error; ImageRefused's depends on its reason. A subclass takes
# its nearest listed ancestor's; a DomainError listed nowhere is a plain 400.
_DOMAIN_STATUS: dict[type[DomainError], int] = {
    GalleryNotFound: 404, ImageNotFound: 404,
    ImageConflict: 409, GalleryConflict: 409,
    RequestInvalid: 422, RequestTooLarge: 413,
    Overloaded: 503, WriteNotReplicated: 503,
}
_REFUSED_STATUS = {"invalid": 400, "unsupported_format": 415, "too_large": 413,
                   "too_many_bytes": 413, "unencodable": 422}
# Retry-After on the errors that a plain retry may mend.
_DOMAIN_HEADERS: dict[type[DomainError], dict[str, str]] = {
    Overloaded: {"Retry-After": "1"}, WriteNotReplicated: {"Retry-After": "1"},
}


def domain_status(exc: DomainError) -> tuple[int, dict[str, str] | None]:
    """The HTTP status and headers that answer ``exc``."""
    if isinstance(exc, ImageRefused):
        return _REFUSED_STATUS[exc.reason], None
    for cls in type(exc).__mro__:
        if cls in _DOMAIN_STATUS:
            return _DOMAIN_STATUS[cls], _DOMAIN_HEADERS.get(cls)
    return 400, None


def _code_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _plain(value: Any) -> Any:
    # Validation errors carry the offending input and exception objects; keep only what
    # serialises, and never echo uploaded bytes back.
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        entry = {"loc": _plain(list(err.get("loc", ()))), "msg": str(err.get("msg", "")),
                 "type": str(err.get("type", ""))}
        if "ctx" in err:
            entry["ctx"] = _plain(err["ctx"])
        details.append(entry)
    return details


def _describe_validation(details: list[dict[str, Any]]) -> str:
    parts = []
    for d in details[:5]:
        loc = ".".join(str(p) for p in d["loc"] if p not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {d['msg']}")
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
    status, headers = domain_status(exc)
    return error_response(status, exc.code, exc.message, exc.details, headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = _validation_details(exc)
    return error_response(422, "validation_error", _describe_validation(details), details)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    if status == 413:
        return error_response(413, "payload_too_large", str(exc.detail))
    message = exc.detail if isinstance(exc.detail, str) else _code_for(status)
    if status == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return error_response(status, _code_for(status), message,
                          headers=getattr(exc, "headers", None))


async def _store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    log.warning("store unavailable: %s", exc)  # the log keeps the address and the cause
    return error_response(503, "store_unavailable", exc.public, headers={"Retry-After": "1"})


async def _invalid_item(request: Request, exc: InvalidItem) -> JSONResponse:
    # A store checks every item before it writes anything (GalleryItem.check), so this
    # arrives with nothing of the request stored.
    return error_response(422, "invalid_item", str(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; see the service log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(InvalidItem, _invalid_item)
    app.add_exception_handler(Exception, _unexpected)
