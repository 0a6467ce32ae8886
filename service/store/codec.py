"""The byte format of cached tensors, one definition for every store.

A gallery item's tensors are stored per field as raw little-endian bytes of ``dtype``
(``float32`` or ``float16``), C order, no header: the shape and dtype come from the model's
manifest, and the store's namespace (model id and cache dtype) keeps bytes of another model
or dtype out of reach. :class:`TensorCodec` writes and checks them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

__all__ = ["CACHE_DTYPES", "TensorCodec", "decode_entries"]

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_DTYPES = ("float32", "float16")


class TensorCodec:
    """Fields of fixed shapes <-> bytes. ``spec``: field -> shape of one item (no batch
    axis); ``required``: the fields every decoded batch must hold."""

    def __init__(self, spec: Mapping[str, tuple[int, ...]], dtype: str = "float32",
                 required: Sequence[str] = ()) -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, not {dtype!r}")
        self.spec = {f: tuple(shape) for f, shape in spec.items()}
        self.dtype = dtype
        self.required = tuple(required)
        self._np = np.dtype(dtype).newbyteorder("<")

    def item_bytes(self, field: str) -> int:
        return math.prod(self.spec[field]) * self._np.itemsize

    def encode(self, item: Mapping[str, np.ndarray]) -> dict[str, bytes]:
        """One item (no batch axis) -> bytes per field, any subset of ``spec``. Raises
        ValueError for unknown fields, wrong shapes or values that ``dtype`` cannot hold
        (non-finite, or beyond float16's range)."""
        out = {}
        for f, value in item.items():
            if f not in self.spec:
                raise ValueError(f"unknown field {f!r}; storable: {list(self.spec)}")
            value = np.asarray(value)
            if value.shape != self.spec[f]:
                raise ValueError(f"field {f!r} of one item must have shape {self.spec[f]}, "
                                 f"not {value.shape}")
            stored = np.ascontiguousarray(value, self._np)
            if not np.isfinite(stored).all():
                raise ValueError(f"field {f!r} has values that {self.dtype} cannot hold")
            out[f] = stored.tobytes()
        return out

    def decode(self, items: Sequence[Mapping[str, bytes]]) -> dict[str, np.ndarray]:
        """Several items' bytes -> a batch ``{field: (n, *shape)}`` in ``dtype``.

        Every item must hold every ``required`` field and the same fields as the first.
        Raises ValueError, naming the item and field, for missing or unknown fields, a byte
        count that does not match the field's shape, or non-finite values.
        """
        items = list(items)
        keys = set(items[0]) if items else set(self.required)
        missing = [f for f in self.required if f not in keys]
        unknown = sorted(keys - set(self.spec))
        if missing or unknown:
            raise ValueError(f"cached item 0 lacks {missing} or has unknown fields {unknown}")
        out = {}
        for f in [f for f in self.spec if f in keys]:
            shape, size = self.spec[f], self.item_bytes(f)
            chunks = []
            for k, item in enumerate(items):
                if set(item) != keys:
                    raise ValueError(f"cached item {k} has fields {sorted(item)}, item 0 "
                                     f"has {sorted(keys)}")
                data = item[f]
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise ValueError(f"cached item {k}, field {f!r}: expected bytes, "
                                     f"not {type(data).__name__}")
                if len(data) != size:
                    raise ValueError(f"cached item {k}, field {f!r}: {len(data)} bytes, "
                                     f"expected {size} ({self.dtype} {shape}); corrupt, "
                                     "or stored by another model or cache dtype")
                chunks.append(data)
            array = np.frombuffer(b"".join(chunks), self._np).reshape(len(items), *shape)
            if not np.isfinite(array).all():
                bad = int(np.flatnonzero(~np.isfinite(array).reshape(len(items), -1)
                                         .all(axis=1))[0])
                raise ValueError(f"cached item {bad}, field {f!r}: non-finite values; corrupt")
            out[f] = array.astype(self._np.newbyteorder("="), copy=False)
        return out


def decode_entries(codec: TensorCodec, entries: Sequence[tuple[T, Mapping[str, bytes]]],
                   context: str = "") -> tuple[list[T], dict[str, np.ndarray] | None, int]:
    """Stored entries ``(item, {field: bytes})`` -> (the items kept, their batch or ``None``
    when none is readable, how many were skipped). An entry that lacks a required field or
    does not decode is left out and logged: one damaged entry never fails the rest."""
    good = [(item, blobs) for item, blobs in entries
            if all(f in blobs for f in codec.required)]
    try:
        batch = codec.decode([blobs for _, blobs in good]) if good else None
        return [item for item, _ in good], batch, len(entries) - len(good)
    except ValueError:
        pass
    kept = []
    for item, blobs in good:  # find the broken ones
        try:
            codec.decode([blobs])
            kept.append((item, blobs))
        except ValueError as exc:
            log.warning("%sskipping unreadable cache entry %s: %s", context,
                        getattr(item, "image_id", item), exc)
    skipped = len(entries) - len(kept)
    if not kept:
        return [], None, skipped
    return [item for item, _ in kept], codec.decode([blobs for _, blobs in kept]), skipped
