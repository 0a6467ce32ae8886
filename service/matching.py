"""What the routes do, without HTTP: read an uploaded image, turn gallery images into cached
blobs, rank a gallery for a probe: from its resident copy (exhaustive or two-stage), or
streamed from the store one chunk at a time when it is not resident.

Blocking (ONNX Runtime, the store): the routes call these from FastAPI's thread pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.formats import EMBEDDING_FIELD
from model.preprocess import ImageDecodeError, decode_image, header_decode_bytes
from model.retrieval import l2_normalise, shortlist

from .engine import MAPS_FIELD
from .errors import ServiceError
from .metrics import ServiceMetrics
from .store import GalleryItem, GalleryStore
from .store.codec import decode_entries
from .store.resident import GalleryView, ResidentCache
from .thumbnails import make_thumbnail

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ENCODE_BATCH", "DecodedImage", "DecodeBudget", "read_image", "gallery_blobs",
           "CameraFilter",
           "RunningTopK", "QueryOutcome", "rank_gallery", "rank_view", "rank_streamed",
           "encode_probe"]

log = logging.getLogger(__name__)

ENCODE_BATCH = 32  # images per trunk call when encoding an upload: bounds the input batch


@dataclass(frozen=True)
class DecodedImage:
    tensor: np.ndarray          # (3, H, W) float32, the network's input
    width: int | None           # the upright image's size
    height: int | None
    thumbnail: bytes | None = None  # a small JPEG of it, when asked for


def _image_error(status: int, code: str, reason: str, filename: str | None,
                 index: int | None) -> ServiceError:
    where = "image" if index is None else f"images[{index}]"
    if filename:
        where += f" ({filename!r})"
    return ServiceError(status, code, f"{where}: {reason}",
                        details={"index": index, "filename": filename})


# How each reason of model.preprocess.ImageDecodeError reaches the client.
_DECODE_ERRORS = {
    "empty": (400, "invalid_image"),
    "unreadable": (400, "invalid_image"),
    "unsupported_format": (415, "unsupported_image_format"),
    "too_many_pixels": (413, "image_too_large"),
}


class DecodeBudget:
    """Bytes of image decoding in flight in this process, bounded: an image whose decoding
    (estimated from its header) would take the total past ``max_bytes`` is answered 503
    ``overloaded`` at once, so that concurrent uploads of small files that decode big cannot
    take the process's memory. One image at a time always fits (the per-image limit bounds
    it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.in_flight = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._lock:
            if self.in_flight and self.in_flight + nbytes > self.max_bytes:
                raise ServiceError(503, "overloaded",
                                   f"images being decoded take {self.in_flight} bytes; this "
                                   f"one needs {nbytes} more, past the {self.max_bytes} "
                                   "allowed at once: retry", {"kind": "decode"},
                                   {"Retry-After": "1"})
            self.in_flight += nbytes
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= nbytes


def read_image(data: bytes, engine: Engine, max_bytes: int, max_pixels: int,
               filename: str | None = None, index: int | None = None,
               thumbnail: bool = False, max_decode_bytes: int | None = None,
               budget: DecodeBudget | None = None) -> DecodedImage:
    """Check and decode one uploaded image into the network's input (and its thumbnail,
    :func:`service.thumbnails.make_thumbnail`, when ``thumbnail``).

    Raises :class:`ServiceError`: 413 for too many bytes, pixels or decoding bytes (checked
    from the header, before any pixel is decoded), 415 for a format the service does not
    take, 400 for anything unreadable (empty, truncated, not an image, NaN pixels), 503 when
    ``budget`` has no room for its decoding now. The message names the file.
    """
    if len(data) > max_bytes:
        raise _image_error(413, "payload_too_large",
                           f"{len(data)} bytes; at most {max_bytes} bytes per image",
                           filename, index)
    with budget.hold(header_decode_bytes(data)) if budget is not None else nullcontext():
        try:
            # upright (EXIF applied), RGB
            image = decode_image(data, max_pixels, max_decode_bytes)
        except ImageDecodeError as exc:
            status, code = _DECODE_ERRORS[exc.reason]
            raise _image_error(status, code, str(exc), filename, index) from exc
        return DecodedImage(engine.preprocess(image), image.width, image.height,
                            make_thumbnail(image) if thumbnail else None)


def gallery_blobs(engine: Engine, tensors: Sequence[np.ndarray],
                  filenames: Sequence[str | None] | None = None) -> list[dict[str, bytes]]:
    """Gallery images' inputs -> per image, as bytes: the engine's cached gallery fields and
    the conv5 map (``MAPS_FIELD``), encoded by the gallery-side stream ``ENCODE_BATCH``
    images at a time. A value the cache dtype cannot hold is a 422 naming the file."""
    blobs: list[dict[str, bytes]] = []
    for start in range(0, len(tensors), ENCODE_BATCH):
        batch = np.stack(tensors[start:start + ENCODE_BATCH])
        maps = engine.encode(batch, stream="b")
        prepared = engine.prepare_gallery(maps)
        for k in range(len(batch)):
            item = {f: arr[k] for f, arr in prepared.items()}
            item[MAPS_FIELD] = maps[k]
            try:
                blobs.append(engine.codec.encode(item))
            except ValueError as exc:
                index = start + k
                name = filenames[index] if filenames else None
                raise _image_error(422, "unencodable_image", f"cannot be cached: {exc}",
                                   name, index) from exc
    return blobs


def encode_probe(engine: Engine, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """A probe's input ``(3, H, W)`` -> the engine's probe side (stream A)."""
    return engine.prepare_probe(engine.encode(tensor[None], stream="a"))


def _nan_as_worst(scores: np.ndarray) -> np.ndarray:
    """A NaN similarity (a degenerate cached entry) becomes -1, the worst cosine: it ranks
    last and the answer stays valid JSON."""
    return np.where(np.isnan(scores), scores.dtype.type(-1.0), scores)


class RunningTopK:
    """The best ``k`` of a stream of scored items, without keeping the stream.

    Ties keep the order the items came in (insertion order of the gallery).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self._scores = np.empty(0, dtype=np.float64)
        self._order = np.empty(0, dtype=np.int64)
        self._items: list[GalleryItem] = []
        self._seen = 0

    def push(self, scores: np.ndarray, items: Sequence[GalleryItem]) -> None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(items):
            raise ValueError(f"{len(scores)} scores for {len(items)} items")
        scores = _nan_as_worst(scores)
        order = np.arange(self._seen, self._seen + len(items))
        self._seen += len(items)
        all_scores = np.concatenate([self._scores, scores])
        all_order = np.concatenate([self._order, order])
        all_items = self._items + list(items)
        keep = np.lexsort((all_order, -all_scores))[:self.k]
        self._scores, self._order = all_scores[keep], all_order[keep]
        self._items = [all_items[i] for i in keep]

    def ranked(self) -> list[tuple[GalleryItem, float]]:
        return [(item, float(s)) for item, s in zip(self._items, self._scores, strict=True)]


@dataclass(frozen=True)
class CameraFilter:
    """Which gallery cameras a query keeps: those in ``only`` (all when ``None``) and not in
    ``excluded``."""

    only: frozenset[str] | None = None
    excluded: frozenset[str] = frozenset()

    @classmethod
    def of(cls, only: Iterable[str] | None, excluded: Iterable[str] = ()) -> CameraFilter:
        return cls(frozenset(only) if only is not None else None, frozenset(excluded))

    def accepts(self, item: GalleryItem) -> bool:
        return item.camera_id not in self.excluded and (self.only is None
                                                        or item.camera_id in self.only)


@dataclass
class QueryOutcome:
    ranked: list[tuple[GalleryItem, float]]
    scored: int          # items ranked (after the filters)
    fetch_s: float
    score_s: float
    rescored: int = 0    # of them, scored by the pair head
    rerank: int = 0      # the shortlist length asked for; 0: exhaustive
    shortlist_s: float = 0.0
    resident: bool = False


def _decode_chunk(engine: Engine, entries: list[tuple[GalleryItem, dict[str, bytes]]],
                  metrics: ServiceMetrics, gallery: str
                  ) -> tuple[list[GalleryItem], dict[str, np.ndarray] | None]:
    """Chunk entries -> (items, batch); unreadable entries are left out and logged."""
    items, batch, skipped = decode_entries(engine.codec, entries, f"gallery {gallery}: ")
    if skipped:
        metrics.items_skipped.inc(skipped)
    return items, batch


def rank_gallery(engine: Engine, store: GalleryStore, gallery: str,
                 probe: dict[str, np.ndarray], top_k: int, cameras: CameraFilter,
                 metrics: ServiceMetrics, cache: ResidentCache | None = None, rerank: int = 0,
                 size_hint: int | None = None) -> QueryOutcome:
    """The ``top_k`` best items of ``gallery`` for ``probe``: from the resident copy in
    ``cache`` when it fits there (:func:`rank_view`), else streamed from the store
    (:func:`rank_streamed`, exhaustive)."""
    if cache is not None:
        t0 = time.perf_counter()
        view, report = cache.view(store, gallery, size_hint,
                                  placer=engine if engine.places_galleries else None)
        metrics.cache_syncs.labels(report.outcome).inc()
        if report.outcome != "fresh":  # nothing loaded, replayed or evicted otherwise
            metrics.resident_bytes.set(cache.nbytes)
        if report.skipped:
            metrics.items_skipped.inc(report.skipped)
        if view is not None:
            outcome = rank_view(engine, view, probe, top_k, cameras, rerank, metrics)
            outcome.fetch_s = time.perf_counter() - t0 - outcome.score_s
            return outcome
    return rank_streamed(engine, store, gallery, probe, top_k, cameras, metrics)


def _head_scores(engine: Engine, view: GalleryView, probe: dict[str, np.ndarray],
                 rows: np.ndarray, metrics: ServiceMetrics) -> np.ndarray:
    """Pair-head similarities of ``rows`` of ``view``, gathered ``batch_size`` rows at a time
    as the engine's head threads take them."""
    step, n = engine.batch_size, len(rows)
    # Consecutive rows (an exhaustive query, no camera filter) are sliced, not copied.
    first = int(rows[0]) if n and bool(np.all(np.diff(rows) == 1)) else None

    def pick(k: int) -> slice | np.ndarray:
        return rows[k:k + step] if first is None else slice(first + k, first + min(k + step, n))

    chunks = ({f: a[pick(k)] for f, a in view.arrays.items()} for k in range(0, n, step))
    t0 = time.perf_counter()
    scores = engine.score(probe, chunks)
    metrics.score_batch.observe(time.perf_counter() - t0)
    metrics.pairs_scored.inc(n)
    return scores


def rank_view(engine: Engine, view: GalleryView, probe: dict[str, np.ndarray], top_k: int,
              cameras: CameraFilter, rerank: int, metrics: ServiceMetrics) -> QueryOutcome:
    """Rank a resident gallery. ``rerank`` > 0 and an embedding field: two-stage (stage one
    ranks every accepted item by the embeddings' cosine, the pair head re-scores the best
    ``max(rerank, top_k)``); else exhaustive (the pair head scores every accepted item)."""
    start = time.perf_counter()
    candidates = np.flatnonzero(view.camera_mask(cameras.only, cameras.excluded))
    shortlist_s = 0.0
    if rerank and view.unit_embedding is not None and max(rerank, top_k) < len(candidates):
        t0 = time.perf_counter()
        query = l2_normalise(np.asarray(probe[EMBEDDING_FIELD]).reshape(1, -1))[0]
        stage_one = (view.unit_embedding @ query)[candidates]
        rows = candidates[shortlist(stage_one, max(rerank, top_k))]
        shortlist_s = time.perf_counter() - t0
    else:
        rows = candidates
    if view.placed is not None and len(rows) == len(candidates):
        # Exhaustive on a placed gallery: every row scored where it lies (removed and
        # filtered rows too, dropped after), no copy per call.
        t0 = time.perf_counter()
        scores = engine.score_placed(probe, view.placed)[rows]
        metrics.score_batch.observe(time.perf_counter() - t0)
        metrics.pairs_scored.inc(len(view.alive))
    else:
        scores = _head_scores(engine, view, probe, rows, metrics)
    scores = _nan_as_worst(scores)
    best = shortlist(scores, top_k)
    ranked = [(view.items[rows[i]], float(scores[i])) for i in best]
    return QueryOutcome(ranked, scored=len(candidates), fetch_s=0.0,
                        score_s=time.perf_counter() - start, rescored=len(rows),
                        rerank=rerank if len(rows) < len(candidates) else 0,
                        shortlist_s=shortlist_s, resident=True)


def rank_streamed(engine: Engine, store: GalleryStore, gallery: str,
                  probe: dict[str, np.ndarray], top_k: int, cameras: CameraFilter,
                  metrics: ServiceMetrics) -> QueryOutcome:
    """Score ``probe`` against every accepted item of ``gallery``, ``engine.batch_size``
    items at a time (each chunk fetched in one pipelined read), keeping only the best
    ``top_k``: memory stays bounded by the chunk, whatever the gallery's size."""
    top = RunningTopK(top_k)
    fetch_s = score_s = 0.0
    scored = 0
    chunks = store.iter_chunks(gallery, engine.gallery_fields, engine.batch_size)
    while True:
        t0 = time.perf_counter()
        entries = next(chunks, None)
        fetch_s += time.perf_counter() - t0
        if entries is None:
            break
        entries = [(item, blobs) for item, blobs in entries if cameras.accepts(item)]
        items, batch = _decode_chunk(engine, entries, metrics, gallery)
        if batch is None:
            continue
        t0 = time.perf_counter()
        scores = engine.score(probe, [batch])
        elapsed = time.perf_counter() - t0
        score_s += elapsed
        metrics.score_batch.observe(elapsed)
        metrics.pairs_scored.inc(len(items))
        scored += len(items)
        top.push(scores, items)
    return QueryOutcome(top.ranked(), scored, fetch_s, score_s, rescored=scored)
