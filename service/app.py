"""The FastAPI app: ``create_app(settings=None, engine=None, store=None)``.

Without an engine, the app loads the model named by the settings in a background thread at
startup, so that ``/healthz`` answers at once and ``/readyz`` says when the model is there.
Without a store, it builds one for the model: Redis when ``DSMI_REDIS_URL`` is set, else an
in-process store that keeps nothing across restarts (and says so, in the log and /readyz).
The store is namespaced by the model id (and cache dtype): galleries encoded by another model
are never seen.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI

from model.formats import EMBEDDING_FIELD

from .deps import require_api_key
from .errors import install_error_handlers
from .matching import DecodeBudget
from .metrics import MetricsMiddleware, ServiceMetrics
from .middleware import (
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodyDeadlineMiddleware,
    BodyLimitMiddleware,
)
from .ranking import GalleryRanker
from .routers import console, docs, galleries, health, query
from .routers.common import errors
from .settings import Settings
from .store import GalleryStore, MemoryGalleryStore, RedisGalleryStore, StoreUnavailable
from .store.resident import ResidentCache

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["create_app", "build_store", "load_engine", "store_namespace"]

log = logging.getLogger("service")

MEMORY_STORE_WARNING = ("galleries are kept in this process's memory only and are lost when it "
                        "stops: set DSMI_REDIS_URL to keep them")

try:
    __version__ = version("dsmi-reid")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

DESCRIPTION = """
Person re-identification matching with a DSMI network (Deep Spatially Multiplicative
Integration). Upload gallery images with their person and camera ids, then post a probe image
to a gallery and get the gallery back ranked by similarity.

Every error has the body `{"error": {"code", "message", "details"}}`. When API keys are
configured (`DSMI_API_KEYS`), every `/v1` route needs one, as `X-API-Key` or
`Authorization: Bearer`; `/healthz`, `/readyz` and `/metrics` stay open.
"""


def load_engine(settings: Settings) -> Engine:
    """The engine for the settings' model folder (ONNX Runtime, no PyTorch)."""
    from .engine import Engine

    return Engine(settings.resolved_model_dir, providers=settings.providers,
                  batch_size=settings.score_batch, cache_dtype=settings.cache_dtype,
                  warmup=settings.warmup, head_threads=settings.head_threads)


def store_namespace(engine: Engine) -> str:
    """The store namespace of an engine's cache: its model id and cache dtype (bytes of
    another model, or of the same model in another dtype, must never be read)."""
    return engine.cache_namespace


def build_store(settings: Settings, namespace: str) -> GalleryStore:
    """The store the settings ask for, in ``namespace`` (see :func:`store_namespace`)."""
    if settings.redis_url:
        return RedisGalleryStore(settings.redis_url, namespace=namespace,
                                 prefix=settings.redis_prefix,
                                 socket_timeout=settings.redis_socket_timeout,
                                 connect_timeout=settings.redis_connect_timeout,
                                 cluster=settings.redis_cluster,
                                 min_replicas=settings.redis_min_replicas,
                                 wait_timeout_ms=settings.redis_wait_timeout_ms,
                                 default_shards=settings.resolved_gallery_shards,
                                 default_retention_days=settings.retention_days)
    return MemoryGalleryStore(namespace=namespace,
                              default_shards=settings.resolved_gallery_shards,
                              default_retention_days=settings.retention_days)


def _attach(app: FastAPI, engine: Engine, store: GalleryStore | None) -> None:
    """Make ``engine`` (and its store) the app's; the routes start answering."""
    state = app.state
    namespace = store_namespace(engine)
    if store is None:
        store = build_store(state.settings, namespace)
        state.owns_store = True
    elif store.namespace != namespace:
        raise ValueError(f"the store holds the cache of {store.namespace!r}, the engine's is "
                         f"{namespace!r}: activations of different models (or cache dtypes) "
                         "must not be mixed")
    if not store.persistent:
        log.warning("!" * 78)
        log.warning("IN-MEMORY GALLERY STORE: %s", MEMORY_STORE_WARNING)
        log.warning("!" * 78)
        state.warnings.append(MEMORY_STORE_WARNING)
    state.metrics.set_model(engine.model_id, engine.variant, list(engine.providers))
    max_bytes = state.settings.cache_max_bytes
    state.cache = ResidentCache(engine.codec, max_bytes, EMBEDDING_FIELD,
                                clock=store.clock) if max_bytes else None
    try:
        store.finish_deletions()  # a deletion cut short by a stop leaves no garbage behind
    except StoreUnavailable as exc:  # the next start (or the next one's) finishes it
        log.warning("could not finish interrupted deletions: %s", exc)
    state.store = store
    state.engine = engine
    state.ranker = GalleryRanker(engine, store, state.metrics, cache=state.cache,
                                 settings=state.settings, budget=state.decode_budget)
    state.model_status = "ok"
    log.info("model %s (%s) on %s, gallery store: %s", engine.model_id, engine.variant,
             ", ".join(engine.providers), store.kind)


def _load_in_background(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    model_dir = settings.resolved_model_dir
    try:
        log.info("loading model from %s", model_dir)
        engine = load_engine(settings)
        _attach(app, engine, app.state.pending_store)
    except Exception as exc:  # reported by /readyz; the process stays up to say why
        log.exception("could not load the model from %s", model_dir)
        app.state.model_status = f"could not load the model from {model_dir}: {exc}"
    finally:
        app.state.model_loaded.set()


def sweep_expired_once(app: FastAPI) -> int:
    """Purge the store's expired images now (counted in ``dsmi_images_expired``) -> how
    many. Expired images already left every answer; this frees their memory."""
    store = app.state.store
    if store is None:
        return 0
    purged = store.purge_expired()
    if purged:
        app.state.metrics.images_expired.inc(purged)
        log.info("purged %d image(s) past their gallery's retention", purged)
    return purged


def _sweep_expired(app: FastAPI, stop: threading.Event) -> None:
    every = app.state.settings.retention_sweep_seconds
    while not stop.wait(every):
        try:
            sweep_expired_once(app)
        except StoreUnavailable as exc:  # the next sweep tries again
            log.warning("could not purge expired images: %s", exc)
        except Exception:  # the sweep must outlive any one failure
            log.exception("retention sweep failed")


def create_app(settings: Settings | None = None, engine: Engine | None = None,
               store: GalleryStore | None = None) -> FastAPI:
    """The matching service app.

    ``settings``: defaults to :class:`Settings` from the environment. ``engine``: an already
    loaded engine (else the model folder of the settings is loaded at startup). ``store``:
    a gallery store namespaced by the engine's model id (else built from the settings).
    """
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.engine is None and not app.state.model_loaded.is_set():
            threading.Thread(target=_load_in_background, args=(app,), name="dsmi-model-load",
                             daemon=True).start()
        stop = threading.Event()
        threading.Thread(target=_sweep_expired, args=(app, stop), name="dsmi-retention",
                         daemon=True).start()
        yield
        stop.set()
        if app.state.owns_store and app.state.store is not None:
            app.state.store.close()
        metrics.process_exited()

    # The documentation pages come from routers.docs, with their assets from the package
    # (FastAPI's own /docs loads them from a CDN: blank on an offline site).
    app = FastAPI(title="DSMI re-id matching service", version=__version__,
                  description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount(docs.ASSETS_PATH, docs.assets_app(), name="docs-assets")
    app.include_router(docs.router)
    app.mount(console.ASSETS_PATH, console.assets_app(), name="console-assets")
    app.include_router(console.router)
    state = app.state
    state.settings, state.metrics = settings, metrics
    state.decode_budget = DecodeBudget(settings.max_decode_bytes_in_flight)
    state.key_ring = settings.key_ring()
    # No trailing-slash redirects: Starlette builds their Location from the client's Host
    # header; a path with a stray slash is a plain 404 instead.
    app.router.redirect_slashes = False
    state.engine, state.store, state.pending_store = None, None, store
    state.cache = None
    state.owns_store = False
    state.warnings = []
    state.model_status = "the model is loading"
    state.model_loaded = threading.Event()
    if engine is not None:
        _attach(app, engine, store)
        state.model_loaded.set()

    install_error_handlers(app)
    app.include_router(health.router)
    for router in (galleries.router, query.router):
        app.include_router(router, dependencies=[Depends(require_api_key)],
                           responses=errors(401, 403))

    # Added innermost first. The API key is checked before the body is read, the body size
    # and pace while it is read (admission receives it through them), the load once it has
    # arrived; the metrics see every answer, labelled by route template.
    app.add_middleware(AdmissionMiddleware,
                       limits={"query": settings.max_inflight_queries,
                               "upload": settings.max_inflight_uploads},
                       on_refuse=lambda kind: metrics.refused.labels(kind).inc())
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(BodyDeadlineMiddleware, grace_s=settings.body_grace_seconds,
                       min_rate=settings.body_min_rate)
    app.add_middleware(ApiKeyMiddleware, ring=state.key_ring)
    routes = [r for r in app.routes if hasattr(r, "path")]
    routes += [*health.router.routes, *galleries.router.routes, *query.router.routes]
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    metrics.watch_store(lambda: state.store)
    return app
