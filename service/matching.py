"""What the routes do with images, without HTTP: read an uploaded image (within the byte,
pixel and decoding limits), turn gallery images into the bytes a store keeps. Ranking a gallery
for a probe is :mod:`service.ranking`'s.

Blocking (ONNX Runtime): the routes call these from FastAPI's thread pool. Errors a client
causes are :mod:`service.domain`'s (``ImageRefused``); :mod:`service.errors` answers them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.preprocess import ImageDecodeError, decode_image, header_decode_bytes

from .domain import ImageRefused, Overloaded
from .thumbnails import make_thumbnail

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ENCODE_BATCH", "DecodedImage", "DecodeBudget", "read_image", "gallery_blobs"]

ENCODE_BATCH = 32  # images per trunk call when encoding an upload: bounds the input batch


@dataclass(frozen=True)
class DecodedImage:
    tensor: np.ndarray          # (3, H, W) float32, the network's input
    width: int | None           # the upright image's size
    height: int | None
    thumbnail: bytes | None = None  # a small JPEG of it, when asked for


def _refused(reason: str, problem: str, filename: str | None,
             index: int | None) -> ImageRefused:
    """The :class:`ImageRefused` for one image, its message naming it (``images[k]
    ('name.jpg'): problem``, or ``image ...`` for a probe)."""
    where = "image" if index is None else f"images[{index}]"
    if filename:
        where += f" ({filename!r})"
    return ImageRefused(reason, f"{where}: {problem}", index, filename)


# The ImageRefused reason of each model.preprocess.ImageDecodeError reason.
_DECODE_REASONS = {
    "empty": "invalid",
    "unreadable": "invalid",
    "unsupported_format": "unsupported_format",
    "too_many_pixels": "too_large",
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
                raise Overloaded(f"images being decoded take {self.in_flight} bytes; this "
                                 f"one needs {nbytes} more, past the {self.max_bytes} "
                                 "allowed at once: retry", {"kind": "decode"})
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

    Raises :class:`ImageRefused`: ``too_many_bytes`` for a file over ``max_bytes``,
    ``too_large`` for too many pixels or decoding bytes (checked from the header, before any
    pixel is decoded), ``unsupported_format`` for a format the service does not take,
    ``invalid`` for anything unreadable (empty, truncated, not an image, NaN pixels); the
    message names the file. :class:`Overloaded` when ``budget`` has no room for its decoding
    now.
    """
    if len(data) > max_bytes:
        raise _refused("too_many_bytes", f"{len(data)} bytes; at most {max_bytes} bytes per "
                       "image", filename, index)
    with budget.hold(header_decode_bytes(data)) if budget is not None else nullcontext():
        try:
            # upright (EXIF applied), RGB
            image = decode_image(data, max_pixels, max_decode_bytes)
        except ImageDecodeError as exc:
            raise _refused(_DECODE_REASONS[exc.reason], str(exc), filename, index) from exc
        return DecodedImage(engine.preprocess(image), image.width, image.height,
                            make_thumbnail(image) if thumbnail else None)


def gallery_blobs(engine: Engine, tensors: Sequence[np.ndarray],
                  filenames: Sequence[str | None] | None = None) -> list[dict[str, bytes]]:
    """Gallery images' inputs ``(3, H, W)`` -> per image, as bytes: the engine's cached
    gallery fields (``engine.codec``; not the conv5 map, which nothing reads back), encoded
    by the gallery-side stream ``ENCODE_BATCH`` images at a time. A value the cache dtype
    cannot hold is :class:`ImageRefused` ``unencodable``, naming the file."""
    blobs: list[dict[str, bytes]] = []
    for start in range(0, len(tensors), ENCODE_BATCH):
        batch = np.stack(tensors[start:start + ENCODE_BATCH])
        maps = engine.encode(batch, stream="b")
        prepared = engine.prepare_gallery(maps)
        for k in range(len(batch)):
            try:
                blobs.append(engine.codec.encode({f: arr[k] for f, arr in prepared.items()}))
            except ValueError as exc:
                index = start + k
                name = filenames[index] if filenames else None
                raise _refused("unencodable", f"cannot be cached: {exc}", name, index) from exc
    return blobs
