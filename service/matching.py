"""What the routes do, without HTTP: read an uploaded image, turn gallery images into cached
blobs, rank a gallery for a probe one chunk at a time.

Blocking (ONNX Runtime, the store): the routes call these from FastAPI's thread pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.preprocess import ImageDecodeError, decode_image

from .engine import MAPS_FIELD
from .errors import ServiceError
from .metrics import ServiceMetrics
from .store import GalleryItem, GalleryStore

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ENCODE_BATCH", "DecodedImage", "read_image", "gallery_blobs",
           "RunningTopK", "QueryOutcome", "rank_gallery", "encode_probe"]

log = logging.getLogger(__name__)

ENCODE_BATCH = 32  # images per trunk call when encoding an upload: bounds the input batch


@dataclass(frozen=True)
class DecodedImage:
    tensor: np.ndarray          # (3, H, W) float32, the network's input
    width: int | None           # the upright image's size
    height: int | None


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


def read_image(data: bytes, engine: Engine, max_bytes: int, max_pixels: int,
               filename: str | None = None, index: int | None = None) -> DecodedImage:
    """Check and decode one uploaded image into the network's input.

    Raises :class:`ServiceError`: 413 for too many bytes or pixels (the pixel count is checked
    from the header, before any pixel is decoded), 415 for a format the service does not take,
    400 for anything unreadable (empty, truncated, not an image). The message names the file.
    """
    if len(data) > max_bytes:
        raise _image_error(413, "payload_too_large",
                           f"{len(data)} bytes; at most {max_bytes} bytes per image",
                           filename, index)
    try:
        image = decode_image(data, max_pixels)  # upright (EXIF applied), RGB
    except ImageDecodeError as exc:
        status, code = _DECODE_ERRORS[exc.reason]
        raise _image_error(status, code, str(exc), filename, index) from exc
    return DecodedImage(engine.preprocess(image), image.width, image.height)


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
        # A NaN similarity (a degenerate cached entry) ranks last, as the worst cosine.
        scores = np.where(np.isnan(scores), -1.0, scores)
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


@dataclass
class QueryOutcome:
    ranked: list[tuple[GalleryItem, float]]
    scored: int
    fetch_s: float
    score_s: float


def _decode_chunk(engine: Engine, entries: list[tuple[GalleryItem, dict[str, bytes]]],
                  metrics: ServiceMetrics, gallery: str
                  ) -> tuple[list[GalleryItem], dict[str, np.ndarray] | None]:
    """Chunk entries -> (items, batch); unreadable entries are left out and logged."""
    fields = engine.gallery_fields
    good = [(item, blobs) for item, blobs in entries if all(f in blobs for f in fields)]
    try:
        batch = engine.codec.decode([blobs for _, blobs in good]) if good else None
        return [item for item, _ in good], batch
    except ValueError:
        pass
    kept = []
    for item, blobs in good:  # find the broken ones
        try:
            engine.codec.decode([blobs])
            kept.append((item, blobs))
        except ValueError as exc:
            log.warning("gallery %s: skipping unreadable cache entry %s: %s", gallery,
                        item.image_id, exc)
    skipped = len(entries) - len(kept)
    if skipped:
        metrics.items_skipped.inc(skipped)
    if not kept:
        return [], None
    return [item for item, _ in kept], engine.codec.decode([blobs for _, blobs in kept])


def rank_gallery(engine: Engine, store: GalleryStore, gallery: str,
                 probe: dict[str, np.ndarray], top_k: int,
                 accept: Callable[[GalleryItem], bool], metrics: ServiceMetrics) -> QueryOutcome:
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
        entries = [(item, blobs) for item, blobs in entries if accept(item)]
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
    return QueryOutcome(top.ranked(), scored, fetch_s, score_s)
