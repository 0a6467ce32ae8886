"""Dependencies of the routes: settings, metrics, the engine, the store, API keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .auth import ApiKey, KeyRing, required_access
from .errors import ServiceError
from .metrics import ServiceMetrics
from .settings import Settings
from .store import GalleryStore
from .store.resident import ResidentCache

if TYPE_CHECKING:
    from .engine import Engine
    from .matching import DecodeBudget
    from .ranking import GalleryRanker

__all__ = ["get_settings", "get_decode_budget", "get_metrics", "get_engine", "get_store",
           "get_cache", "get_ranker",
           "require_api_key", "authorize", "current_key"]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="An API key (DSMI_API_KEYS, DSMI_API_KEYS_FILE)")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_decode_budget(request: Request) -> DecodeBudget:
    return request.app.state.decode_budget


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


def get_cache(request: Request) -> ResidentCache | None:
    """The resident galleries of this process (``None``: DSMI_CACHE_MAX_BYTES=0)."""
    return getattr(request.app.state, "cache", None)


def get_ranker(request: Request) -> GalleryRanker:
    """The app's :class:`~service.ranking.GalleryRanker`; 503 ``model_unavailable`` (as
    :func:`get_engine`) until the model is loaded."""
    get_engine(request)  # the ranker comes with the engine
    return request.app.state.ranker


def authorize(ring: KeyRing, method: str, path: str, api_key: str | None,
              authorization: str | None) -> tuple[ApiKey | None, ServiceError | None]:
    """The key a request authenticates with and the error to answer (``None`` when the
    request may go on). No keys configured: everything is open. The key comes as
    ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``; 401 without a valid one, 403 when
    the key lacks the right or the gallery (:func:`service.auth.required_access`)."""
    access = required_access(method, path)
    if not ring or access is None:
        return None, None
    given = api_key
    if given is None and authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = credentials.strip()
    challenge = {"WWW-Authenticate": 'Bearer realm="dsmi"'}
    if not given:
        return None, ServiceError(401, "unauthorized", "an API key is required: send it as "
                                  "X-API-Key or Authorization: Bearer", headers=challenge)
    key = ring.find(given)
    if key is None:
        return None, ServiceError(401, "unauthorized", "invalid API key", headers=challenge)
    right, gallery = access
    if not key.allows(right, gallery):
        where = f" on gallery {gallery!r}" if gallery else ""
        return key, ServiceError(403, "forbidden", f"this API key has no {right} right{where}",
                                 details={"right": right, "gallery": gallery})
    return key, None


def current_key(request: Request) -> ApiKey | None:
    """The API key the request was authorised with (``None`` when no keys are configured)."""
    return getattr(request.state, "api_key", None)


def require_api_key(request: Request,
                    api_key: str | None = Security(_api_key_header),
                    bearer: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    """When API keys are configured, the request must carry one with the right scope.

    :class:`service.middleware.ApiKeyMiddleware` decides this before the body is read; this
    dependency documents the two schemes in OpenAPI and refuses a request that reached a
    route without passing it (an app assembled without the middleware)."""
    ring: KeyRing = request.app.state.key_ring
    if ring and current_key(request) is None:
        _, error = authorize(ring, request.method, request.url.path, api_key,
                             request.headers.get("authorization"))
        if error is not None:
            raise error
