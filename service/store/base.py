"""The gallery store contract: named galleries of items, each with metadata and binary blobs.

A store is bound to one model id (its namespace): the activations of two models are never
mixed, because a store only sees the keys of its own model. Blobs are opaque bytes keyed by
field name (the conv5 map and the engine's cached gallery fields).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["GalleryItem", "NewItem", "Chunk", "checked_blobs", "GalleryStore", "StoreError",
           "StoreUnavailable", "new_image_id"]


class StoreError(RuntimeError):
    """The store failed; the message says why."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (Redis down, timed out, refusing writes)."""


def new_image_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class GalleryItem:
    """One stored image's description (everything but its tensors)."""

    image_id: str
    person_id: str
    camera_id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> GalleryItem:
        return cls(**json.loads(data))


@dataclass(frozen=True)
class NewItem:
    """An item to store: its description and its blobs (field name -> bytes)."""

    item: GalleryItem
    blobs: Mapping[str, bytes]


def checked_blobs(items: Sequence[NewItem]) -> list[dict[str, bytes]]:
    """The items' blobs as plain bytes; TypeError (before anything is written) if one is not
    bytes-like."""
    out = []
    for k, new in enumerate(items):
        blobs = {}
        for name, value in new.blobs.items():
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"item {k} ({new.item.image_id}), blob {name!r}: expected "
                                f"bytes, not {type(value).__name__}")
            blobs[str(name)] = bytes(value)
        out.append(blobs)
    return out


# One chunk of a gallery scan: (item, {field: bytes}) in insertion order.
Chunk = list[tuple[GalleryItem, dict[str, bytes]]]


@runtime_checkable
class GalleryStore(Protocol):
    """What the service needs from a gallery store. Every method may raise
    :class:`StoreUnavailable`; none loads a whole gallery's blobs at once."""

    kind: str          # "redis" or "memory"
    persistent: bool   # whether galleries survive a restart of the service
    namespace: str     # the model id whose galleries this store holds

    def ping(self) -> None:
        """Return if the store answers, raise :class:`StoreUnavailable` otherwise."""

    def add_items(self, gallery: str, items: Sequence[NewItem]) -> int:
        """Store all ``items`` in ``gallery`` (created if new) at once: after a failure none
        of them is stored (TypeError, before any write, for a blob that is not bytes).
        Returns the gallery's size afterwards."""

    def gallery_size(self, gallery: str) -> int | None:
        """Number of items, or ``None`` if there is no such gallery."""

    def list_galleries(self) -> dict[str, int]:
        """Gallery name -> size, sorted by name."""

    def list_items(self, gallery: str, offset: int, limit: int
                   ) -> tuple[int, list[GalleryItem]] | None:
        """(total, items ``offset`` .. ``offset + limit - 1`` in insertion order), or ``None``
        if there is no such gallery."""

    def get_item(self, gallery: str, image_id: str) -> GalleryItem | None: ...

    def get_blobs(self, gallery: str, image_id: str, fields: Sequence[str]
                  ) -> dict[str, bytes] | None:
        """The item's blobs of these fields (missing fields left out), or ``None``."""

    def delete_item(self, gallery: str, image_id: str) -> bool:
        """Whether the item existed (and is now gone)."""

    def delete_gallery(self, gallery: str) -> int | None:
        """Delete the gallery and its items; returns how many items it held, ``None`` if
        there was no such gallery."""

    def iter_chunks(self, gallery: str, fields: Sequence[str], chunk_size: int
                    ) -> Iterator[Chunk]:
        """The gallery's items with these blob fields, ``chunk_size`` at a time, in insertion
        order. Items deleted during the scan may be left out; an item lacking one of the
        fields is given without it."""

    def clear(self) -> None:
        """Delete everything this store wrote under its namespace (and nothing else)."""

    def close(self) -> None: ...
