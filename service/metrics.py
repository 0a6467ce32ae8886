"""Prometheus metrics, on a registry per app (so that several apps in one process do not
collide), and the ASGI middleware that counts and times every request."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .store import GalleryStore, StoreError

__all__ = ["ServiceMetrics", "MetricsMiddleware", "CONTENT_TYPE", "route_template",
           "HTTP_METHODS"]

# The method label's values; any other method is counted as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _GalleryCollector(Collector):
    """Gallery sizes and store health, read from the store at scrape time."""

    def __init__(self, store: Callable[[], GalleryStore | None]) -> None:
        self._store = store

    def describe(self):
        # Names only, so that registering does not query the store.
        yield GaugeMetricFamily("dsmi_gallery_images", "Images per gallery", labels=["gallery"])
        yield GaugeMetricFamily("dsmi_store_up", "Whether the gallery store answers",
                                labels=["store"])

    def collect(self):
        sizes = GaugeMetricFamily("dsmi_gallery_images", "Images per gallery",
                                  labels=["gallery"])
        up = GaugeMetricFamily("dsmi_store_up", "Whether the gallery store answers",
                               labels=["store"])
        store = self._store()
        if store is not None:
            try:
                for name, size in store.list_galleries().items():
                    sizes.add_metric([name], size)
                up.add_metric([store.kind], 1)
            except StoreError as exc:
                log.debug("metrics: store unavailable: %s", exc)
                up.add_metric([store.kind], 0)
        yield sizes
        yield up


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder where worker processes share their metrics (``dsmi serve --workers N``
    sets it), or ``None`` for a single process."""
    return os.environ.get(MULTIPROC_ENV) or None


class ServiceMetrics:
    """The service's metrics. ``registry``: where to register them (a new one by default).

    With several worker processes (:func:`multiprocess_dir` set) each worker writes its
    counts to files in that folder and every scrape sums all workers' files, so that
    ``/metrics`` reports the service as a whole, whichever worker answers it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry
        self.requests = Counter("dsmi_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("dsmi_http_request_duration_seconds",
                                 "HTTP request latency by route and status",
                                 ["method", "route", "status"], buckets=_REQUEST_BUCKETS,
                                 registry=r)
        self.pairs_scored = Counter("dsmi_pairs_scored", "Probe-gallery pairs scored",
                                    registry=r)
        self.score_batch = Histogram("dsmi_score_batch_duration_seconds",
                                     "Latency of scoring one batch of gallery items: a chunk "
                                     "streamed from the store, or the rows of a resident "
                                     "gallery that one query scores",
                                     buckets=_BATCH_BUCKETS, registry=r)
        self.query_stage = Histogram("dsmi_query_stage_duration_seconds",
                                     "Query time per stage (encode, fetch, score)", ["stage"],
                                     buckets=_REQUEST_BUCKETS, registry=r)
        self.images_stored = Counter("dsmi_images_stored", "Gallery images stored",
                                     registry=r)
        self.images_expired = Counter("dsmi_images_expired", "Gallery images purged from the "
                                      "store past their gallery's retention", registry=r)
        self.items_skipped = Counter("dsmi_gallery_items_skipped",
                                     "Gallery items skipped in queries: unreadable cache entry",
                                     registry=r)
        self.cache_syncs = Counter("dsmi_gallery_cache_syncs", "Resident-gallery checks before "
                                   "a query, by outcome: fresh (unchanged), replayed (changes "
                                   "applied), reloaded, bypassed (over the memory budget: "
                                   "streamed)", ["outcome"], registry=r)
        self.resident_bytes = Gauge("dsmi_gallery_cache_bytes", "Bytes of resident galleries",
                                    registry=r, multiprocess_mode="livesum")
        self.refused = Counter("dsmi_requests_refused", "Requests refused as overload "
                               "(503 overloaded), by kind", ["kind"], registry=r)
        self.model_info = Gauge("dsmi_model_info", "The loaded model (value 1)",
                                ["model_id", "variant", "providers"], registry=r,
                                multiprocess_mode="max")
        self._store_collector: Collector | None = None

    def watch_store(self, store: Callable[[], GalleryStore | None]) -> None:
        self._store_collector = _GalleryCollector(store)
        self.registry.register(self._store_collector)

    def set_model(self, model_id: str, variant: str, providers: list[str]) -> None:
        self.model_info.labels(model_id, variant, ",".join(providers)).set(1)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # Every label from a closed set: a client may send any method name, and a label value
        # is a time series kept for good (60,000 invented methods grew the process by 282 MB).
        method = method if method in HTTP_METHODS else "other"
        status_label = str(status) if 100 <= status <= 599 else "other"
        labels = (method, route, status_label)
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        # Every worker's files, summed; the store's figures are read once, here.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        if self._store_collector is not None:
            registry.register(self._store_collector)
        return generate_latest(registry)

    @staticmethod
    def process_exited(pid: int | None = None) -> None:
        """Drop an exited worker's live gauges from the shared folder."""
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(pid or os.getpid())


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route that ``scope`` goes to (``"unmatched"`` if none)."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
        if match == Match.PARTIAL and partial is None:  # the path matches, the method not
            partial = getattr(route, "path", None)
    return partial or "unmatched"


class MetricsMiddleware:
    """Counts and times each HTTP request under its route template (``/v1/galleries/
    {gallery}/images``, not the concrete path, so that the label set stays bounded).

    The template is found by matching the request against ``routes`` (also for requests
    answered before routing, such as a 401)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics,
                 routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.observe_request(scope["method"], route_template(self.routes, scope),
                                         status, time.perf_counter() - start)
