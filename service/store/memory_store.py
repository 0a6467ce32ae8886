"""An in-process gallery store for trying the service out: nothing survives a restart."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from .base import Chunk, GalleryItem, NewItem, checked_blobs

__all__ = ["MemoryGalleryStore"]


class MemoryGalleryStore:
    """Galleries in a dict, guarded by one lock (uploads are all or nothing under it)."""

    kind = "memory"
    persistent = False

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self._lock = threading.RLock()
        # gallery -> image_id -> (item, blobs); dicts keep insertion order.
        self._galleries: dict[str, dict[str, tuple[GalleryItem, dict[str, bytes]]]] = {}

    def ping(self) -> None:
        return None

    def add_items(self, gallery: str, items: Sequence[NewItem]) -> int:
        # Check and copy first, then insert under the lock: nothing can fail half-way.
        entries = [(new.item.image_id, (new.item.check(), blobs))
                   for new, blobs in zip(items, checked_blobs(items), strict=True)]
        with self._lock:
            stored = self._galleries.setdefault(gallery, {})
            stored.update(entries)
            return len(stored)

    def gallery_size(self, gallery: str) -> int | None:
        with self._lock:
            stored = self._galleries.get(gallery)
            return None if stored is None else len(stored)

    def list_galleries(self) -> dict[str, int]:
        with self._lock:
            return {name: len(self._galleries[name]) for name in sorted(self._galleries)}

    def list_items(self, gallery: str, offset: int, limit: int
                   ) -> tuple[int, list[GalleryItem]] | None:
        with self._lock:
            stored = self._galleries.get(gallery)
            if stored is None:
                return None
            entries = list(stored.values())
        return len(entries), [item for item, _ in entries[offset:offset + limit]]

    def get_item(self, gallery: str, image_id: str) -> GalleryItem | None:
        with self._lock:
            entry = self._galleries.get(gallery, {}).get(image_id)
        return None if entry is None else entry[0]

    def get_blobs(self, gallery: str, image_id: str, fields: Sequence[str]
                  ) -> dict[str, bytes] | None:
        with self._lock:
            entry = self._galleries.get(gallery, {}).get(image_id)
        if entry is None:
            return None
        return {f: entry[1][f] for f in fields if f in entry[1]}

    def delete_item(self, gallery: str, image_id: str) -> bool:
        with self._lock:
            return self._galleries.get(gallery, {}).pop(image_id, None) is not None

    def delete_gallery(self, gallery: str) -> int | None:
        with self._lock:
            stored = self._galleries.pop(gallery, None)
        return None if stored is None else len(stored)

    def iter_chunks(self, gallery: str, fields: Sequence[str], chunk_size: int
                    ) -> Iterator[Chunk]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        with self._lock:
            stored = self._galleries.get(gallery)
            ids = list(stored) if stored is not None else []
        for start in range(0, len(ids), chunk_size):
            chunk: Chunk = []
            with self._lock:
                stored = self._galleries.get(gallery, {})
                for image_id in ids[start:start + chunk_size]:
                    entry = stored.get(image_id)
                    if entry is not None:  # deleted since the scan began
                        chunk.append((entry[0], {f: entry[1][f] for f in fields
                                                 if f in entry[1]}))
            if chunk:
                yield chunk

    def clear(self) -> None:
        with self._lock:
            self._galleries.clear()

    def close(self) -> None:
        return None
