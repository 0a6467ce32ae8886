"""Dependencies of the routes: settings, metrics, the engine, the store, API keys."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .errors import ServiceError
from .metrics import ServiceMetrics
from .settings import Settings
from .store import GalleryStore

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["get_settings", "get_metrics", "get_engine", "get_store", "require_api_key",
           "api_key_error"]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="One of the keys in DSMI_API_KEYS")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_engine(request: Request) -> Engine:
    engine = request.app.state.engine
    if engine is None:
        raise ServiceError(503, "model_unavailable", request.app.state.model_status,
                           headers={"Retry-After": "5"})
    return engine


def get_store(request: Request) -> GalleryStore:
    store = request.app.state.store
    if store is None:
        raise ServiceError(503, "store_unavailable",
                           f"no gallery store yet: {request.app.state.model_status}",
                           headers={"Retry-After": "5"})
    return store


def _matches_any(given: str, keys: Sequence[str]) -> bool:
    # Every key is compared, each in constant time: neither the time nor the position of a
    # match says anything about the keys.
    given_bytes = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_bytes, key.encode())
    return found


def api_key_error(api_key: str | None, authorization: str | None,
                  keys: Sequence[str]) -> ServiceError | None:
    """The 401 to answer, or ``None`` when no key is needed or a valid one is given.

    The key comes as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
    if not keys:
        return None
    given = api_key
    if given is None and authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = credentials.strip()
    challenge = {"WWW-Authenticate": 'Bearer realm="dsmi"'}
    if not given:
        return ServiceError(401, "unauthorized", "an API key is required: send it as "
                            "X-API-Key or Authorization: Bearer", headers=challenge)
    if not _matches_any(given, keys):
        return ServiceError(401, "unauthorized", "invalid API key", headers=challenge)
    return None


def require_api_key(request: Request,
                    api_key: str | None = Security(_api_key_header),
                    bearer: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    """When ``DSMI_API_KEYS`` is set, the request must carry one of the keys.

    :class:`service.middleware.ApiKeyMiddleware` checks this before the body is read; this
    dependency documents the schemes in OpenAPI and checks again."""
    error = api_key_error(api_key, request.headers.get("authorization"),
                          request.app.state.settings.api_keys)
    if error is not None:
        raise error
