"""Ranking a gallery for a probe image: the query path, without HTTP.

:class:`GalleryRanker` is built once at start-up (``app.state.ranker``) from the engine, the
store, the resident cache (``None`` when DSMI_CACHE_MAX_BYTES=0) and the metrics. The query
route calls :meth:`GalleryRanker.rank` once: it checks the options, reads and encodes the
probe, ranks the gallery and returns a :class:`QueryOutcome`. In order:

1. the options (:class:`QueryOptions`): fields that do not fit together are
   :class:`~service.domain.RequestInvalid`;
2. the gallery must exist (:class:`~service.domain.GalleryNotFound`), before the image is read;
3. the probe image is decoded (:func:`service.matching.read_image`, within the byte, pixel and
   decoding limits: :class:`~service.domain.ImageRefused`) and encoded by stream A;
4. the gallery is ranked: from its resident copy when it fits the cache (:meth:`rank_view`:
   two-stage, the embeddings' cosine then the pair head on a shortlist, or exhaustive), else
   streamed from the store one chunk at a time (:meth:`rank_streamed`, exhaustive, memory
   bounded by the chunk);
5. the best ``top_k`` get their match probability (a calibrated model only), and
   ``min_probability`` keeps those at or above it.

Every stage's time goes to the ``query_stage`` histogram. Blocking (ONNX Runtime, the
store): the route calls :meth:`GalleryRanker.rank` from FastAPI's thread pool.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from model.formats import EMBEDDING_FIELD
from model.retrieval import l2_normalise, shortlist

from .domain import GalleryNotFound, RequestInvalid
from .matching import DecodeBudget, read_image
from .metrics import ServiceMetrics
from .settings import Settings
from .store import GalleryItem, GalleryStore
from .store.codec import decode_entries
from .store.resident import GalleryView, ResidentCache

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["GalleryRanker", "QueryOptions", "QueryOutcome", "Match", "Ranking",
           "CameraFilter", "RunningTopK"]


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


@dataclass(frozen=True)
class QueryOptions:
    """How to rank, as a client asked (the query form's fields, without the image).

    ``top_k``: matches returned; ``rerank``: the shortlist the pair head re-scores (0:
    exhaustive; ``None``: the service's DSMI_RERANK); ``camera_id``: the probe's camera;
    ``exclude_same_camera`` leaves it out (needs ``camera_id``); ``cameras`` keeps only those
    (``None`` or empty: all), ``exclude_cameras`` leaves those out; ``min_probability`` keeps
    the matches at least this likely (needs a calibrated model).
    """

    top_k: int = 10
    rerank: int | None = None
    camera_id: str | None = None
    exclude_same_camera: bool = False
    cameras: Sequence[str] | None = None
    exclude_cameras: Sequence[str] | None = None
    min_probability: float | None = None

    def camera_filter(self) -> CameraFilter:
        """The gallery cameras these options keep. Raises :class:`RequestInvalid` for
        ``exclude_same_camera`` without ``camera_id``."""
        if self.exclude_same_camera and self.camera_id is None:
            raise RequestInvalid("exclude_same_camera needs the probe's camera_id")
        excluded = set(self.exclude_cameras or ())
        if self.exclude_same_camera:
            excluded.add(self.camera_id)
        return CameraFilter.of(self.cameras or None, excluded)


@dataclass(frozen=True)
class Match:
    """One ranked gallery item: its DSMI similarity (cosine, -1 to 1) and its match
    probability (``None`` without a calibration, or for a NaN score)."""

    item: GalleryItem
    score: float
    probability: float | None


@dataclass
class Ranking:
    """What one ranking of a gallery gives (:meth:`GalleryRanker.rank_view`,
    :meth:`~GalleryRanker.rank_streamed`): the best items, best first, with their scores."""

    ranked: list[tuple[GalleryItem, float]]
    scored: int          # items ranked (after the filters)
    fetch_s: float
    score_s: float
    rescored: int = 0    # of them, scored by the pair head
    rerank: int = 0      # the shortlist length asked for; 0: exhaustive
    shortlist_s: float = 0.0
    resident: bool = False


@dataclass(frozen=True)
class QueryOutcome:
    """The answer to one query (:meth:`GalleryRanker.rank`): ``matches`` best first, at most
    ``top_k`` (fewer with ``min_probability``), what was scored, and the seconds per stage
    (``encode_s``: reading, decoding and encoding the probe; ``fetch_s``: the store, for a
    resident gallery its generation check and any changes replayed; ``score_s``: both
    stages, of which ``shortlist_s`` stage one; ``total_s``: all of it)."""

    gallery: str
    model_id: str
    gallery_size: int
    matches: list[Match]
    scored: int
    rescored: int
    rerank: int
    resident: bool
    encode_s: float
    fetch_s: float
    shortlist_s: float
    score_s: float
    total_s: float


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


class GalleryRanker:
    """Ranks a gallery for a probe image: one per app, built when the model is attached.

    ``engine``: the model (ONNX Runtime); ``store``: the galleries; ``metrics``: where the
    query's counters and timings go; ``cache``: the galleries resident in this process
    (``None``: every query streams its gallery from the store); ``settings``: the image limits
    and the default ``rerank``; ``budget``: the bytes of image decoding in flight in this
    process, shared with uploads (``None``: unbounded).
    """

    def __init__(self, engine: Engine, store: GalleryStore, metrics: ServiceMetrics,
                 cache: ResidentCache | None = None, settings: Settings | None = None,
                 budget: DecodeBudget | None = None) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.cache = cache
        self.settings = settings if settings is not None else Settings()
        self.budget = budget
        # Resident galleries' rows placed where the head runs (the engine's device), per
        # set of arrays (GalleryView.layout, held weakly: dropped with the arrays):
        # (rows placed, the placed chunks). Only rows added since are placed by a query.
        self.place_galleries = engine.places_galleries
        self._placements: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._placing = threading.Lock()

    def _placed(self, view: GalleryView) -> list:
        """``view``'s rows placed where the head runs, in the engine's chunks (device memory
        is not counted in the resident cache's budget)."""
        n, chunk = len(view.alive), self.engine.chunk_rows
        with self._placing:
            rows, placed = self._placements.get(view.layout, (0, []))
            if rows < n:
                first = rows // chunk
                placed = placed[:first] + self.engine.place(view.arrays, first * chunk, n)
                self._placements[view.layout] = (n, placed)
            return list(placed)

    # -- the one call of the query route ----------------------------------------------------

    def rank(self, gallery: str, image: bytes | BinaryIO, options: QueryOptions,
             filename: str | None = None) -> QueryOutcome:
        """Rank ``gallery`` for the probe ``image`` (its bytes, or a file read up to one byte
        past the limit) as ``options`` ask.

        Raises :class:`~service.domain.RequestInvalid` for options that do not fit together
        (or ``min_probability`` on a model without calibration),
        :class:`~service.domain.GalleryNotFound`, :class:`~service.domain.ImageRefused` for
        a probe that cannot be used (``filename`` named in the message),
        :class:`~service.domain.Overloaded` when the decoding budget is full; the store's
        ``StoreUnavailable``.
        """
        start = time.perf_counter()
        cameras = options.camera_filter()
        if options.min_probability is not None and self.engine.calibration is None:
            raise RequestInvalid("min_probability needs a calibrated model; this one has none "
                                 "(export it with a calibration.json)")
        size = self.store.gallery_size(gallery)
        if size is None:
            raise GalleryNotFound(gallery)
        limits = self.settings
        data = image if isinstance(image, (bytes, bytearray)) else image.read(
            limits.max_image_bytes + 1)  # one byte past the limit tells "too large"
        decoded = read_image(bytes(data), self.engine, limits.max_image_bytes,
                             limits.max_pixels, filename,
                             max_decode_bytes=limits.max_decode_bytes, budget=self.budget)
        probe = self.encode_probe(decoded.tensor)
        encode_s = time.perf_counter() - start
        rerank = limits.rerank if options.rerank is None else options.rerank
        ranking = self.rank_encoded(gallery, probe, options.top_k, cameras, rerank,
                                    size_hint=size)
        matches = self._matches(ranking.ranked, options.min_probability)
        total_s = time.perf_counter() - start
        for stage, seconds in (("encode", encode_s), ("fetch", ranking.fetch_s),
                               ("shortlist", ranking.shortlist_s), ("score", ranking.score_s)):
            self.metrics.query_stage.labels(stage).observe(seconds)
        return QueryOutcome(
            gallery=gallery, model_id=self.engine.model_id, gallery_size=size,
            matches=matches, scored=ranking.scored, rescored=ranking.rescored,
            rerank=ranking.rerank, resident=ranking.resident, encode_s=encode_s,
            fetch_s=ranking.fetch_s, shortlist_s=ranking.shortlist_s,
            score_s=ranking.score_s, total_s=total_s)

    def _matches(self, ranked: list[tuple[GalleryItem, float]],
                 min_probability: float | None) -> list[Match]:
        """Ranked items -> matches with their probability, those below ``min_probability``
        left out (a NaN probability is none, and never passes it)."""
        calibration = self.engine.calibration
        scores = np.array([score for _, score in ranked], dtype=np.float64)
        probabilities: list[float | None] = (
            [None if p != p else p for p in calibration.probability(scores).tolist()]
            if calibration is not None else [None] * len(ranked))
        return [Match(item, score, p)
                for (item, score), p in zip(ranked, probabilities, strict=True)
                if min_probability is None or (p is not None and p >= min_probability)]

    # -- the stages, for benchmarks and tests too -------------------------------------------

    def encode_probe(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """A probe's input ``(3, H, W)`` -> the engine's probe side (stream A), each field
        ``(1, *shape)`` float32."""
        engine = self.engine
        return engine.prepare_probe(engine.encode(tensor[None], stream="a"))

    def rank_encoded(self, gallery: str, probe: dict[str, np.ndarray], top_k: int,
                     cameras: CameraFilter, rerank: int = 0,
                     size_hint: int | None = None) -> Ranking:
        """The ``top_k`` best items of ``gallery`` for an encoded ``probe``: from the
        resident copy when it fits the cache (:meth:`rank_view`), else streamed from the
        store (:meth:`rank_streamed`, exhaustive). ``size_hint``: the gallery's size if
        known (a gallery too large for the cache is then not loaded)."""
        cache, metrics = self.cache, self.metrics
        if cache is not None:
            t0 = time.perf_counter()
            view, report = cache.view(self.store, gallery, size_hint)
            metrics.cache_syncs.labels(report.outcome).inc()
            if report.outcome != "fresh":  # nothing loaded, replayed or evicted otherwise
                metrics.resident_bytes.set(cache.nbytes)
            if report.skipped:
                metrics.items_skipped.inc(report.skipped)
            if view is not None:
                ranking = self.rank_view(view, probe, top_k, cameras, rerank)
                ranking.fetch_s = time.perf_counter() - t0 - ranking.score_s
                return ranking
        return self.rank_streamed(gallery, probe, top_k, cameras)

    def rank_view(self, view: GalleryView, probe: dict[str, np.ndarray], top_k: int,
                  cameras: CameraFilter, rerank: int = 0) -> Ranking:
        """Rank a resident gallery. ``rerank`` > 0 and an embedding field: two-stage (stage
        one ranks every accepted item by the embeddings' cosine, the pair head re-scores the
        best ``max(rerank, top_k)``); else exhaustive (the pair head scores every accepted
        item)."""
        engine, metrics = self.engine, self.metrics
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
        placed = self._placed(view) if self.place_galleries else None
        if placed is not None and len(rows) == len(candidates):
            # Exhaustive on a placed gallery: every row scored where it lies (removed and
            # filtered rows too, dropped after), no copy per call.
            t0 = time.perf_counter()
            scores = engine.score_placed(probe, placed)[rows]
            metrics.score_batch.observe(time.perf_counter() - t0)
            metrics.pairs_scored.inc(len(view.alive))
        else:
            scores = self._head_scores(view, probe, rows)
        scores = _nan_as_worst(scores)
        best = shortlist(scores, top_k)
        ranked = [(view.items[rows[i]], float(scores[i])) for i in best]
        return Ranking(ranked, scored=len(candidates), fetch_s=0.0,
                       score_s=time.perf_counter() - start, rescored=len(rows),
                       rerank=rerank if len(rows) < len(candidates) else 0,
                       shortlist_s=shortlist_s, resident=True)

    def _head_scores(self, view: GalleryView, probe: dict[str, np.ndarray],
                     rows: np.ndarray) -> np.ndarray:
        """Pair-head similarities of ``rows`` of ``view``, gathered ``batch_size`` rows at a
        time as the engine's head threads take them."""
        engine = self.engine
        step, n = engine.batch_size, len(rows)
        # Consecutive rows (an exhaustive query, no camera filter) are sliced, not copied.
        first = int(rows[0]) if n and bool(np.all(np.diff(rows) == 1)) else None

        def pick(k: int) -> slice | np.ndarray:
            return (rows[k:k + step] if first is None
                    else slice(first + k, first + min(k + step, n)))

        chunks = ({f: a[pick(k)] for f, a in view.arrays.items()} for k in range(0, n, step))
        t0 = time.perf_counter()
        scores = engine.score(probe, chunks)
        self.metrics.score_batch.observe(time.perf_counter() - t0)
        self.metrics.pairs_scored.inc(n)
        return scores

    def rank_streamed(self, gallery: str, probe: dict[str, np.ndarray], top_k: int,
                      cameras: CameraFilter) -> Ranking:
        """Score ``probe`` against every accepted item of ``gallery``, ``engine.batch_size``
        items at a time (each chunk fetched in one pipelined read), keeping only the best
        ``top_k``: memory stays bounded by the chunk, whatever the gallery's size. An entry
        that does not decode is left out, logged and counted."""
        engine, metrics = self.engine, self.metrics
        top = RunningTopK(top_k)
        fetch_s = score_s = 0.0
        scored = 0
        chunks = self.store.iter_chunks(gallery, engine.gallery_fields, engine.batch_size)
        while True:
            t0 = time.perf_counter()
            entries = next(chunks, None)
            fetch_s += time.perf_counter() - t0
            if entries is None:
                break
            entries = [(item, blobs) for item, blobs in entries if cameras.accepts(item)]
            items, batch, skipped = decode_entries(engine.codec, entries,
                                                   f"gallery {gallery}: ")
            if skipped:
                metrics.items_skipped.inc(skipped)
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
        return Ranking(top.ranked(), scored, fetch_s, score_s, rescored=scored)
