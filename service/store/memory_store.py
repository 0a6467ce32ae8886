"""An in-process gallery store for trying the service out: nothing survives a restart."""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Iterator, Sequence

from .base import (
    CHANGE_LOG_MAX,
    Change,
    Chunk,
    GalleryItem,
    Generation,
    NewItem,
    checked_blobs,
)

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
        # gallery -> (its generation, its last changes), as the Redis store keeps them.
        self._log: dict[str, tuple[Generation, deque[Change]]] = {}

    def _record(self, gallery: str, op: str, image_ids: Sequence[str]) -> None:
        """Advance the gallery's generation and log the change (under the lock)."""
        gen, changes = self._log.get(gallery) or (Generation(uuid.uuid4().hex, 0),
                                                  deque(maxlen=CHANGE_LOG_MAX))
        gen = Generation(gen.epoch, gen.number + 1)
        changes.append(Change(gen.number, op, tuple(image_ids)))
        self._log[gallery] = (gen, changes)

    def ping(self) -> None:
        return None

    def add_items(self, gallery: str, items: Sequence[NewItem]) -> int:
        # Check and copy first, then insert under the lock: nothing can fail half-way.
        entries = [(new.item.image_id, (new.item.check(), blobs))
                   for new, blobs in zip(items, checked_blobs(items), strict=True)]
        with self._lock:
            stored = self._galleries.setdefault(gallery, {})
            for image_id, _ in entries:
                stored.pop(image_id, None)  # a re-stored id moves to the end, as in Redis
            stored.update(entries)
            if entries:
                self._record(gallery, "add", [image_id for image_id, _ in entries])
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
            removed = self._galleries.get(gallery, {}).pop(image_id, None) is not None
            if removed:
                self._record(gallery, "remove", [image_id])
            return removed

    def delete_gallery(self, gallery: str) -> int | None:
        with self._lock:
            stored = self._galleries.pop(gallery, None)
            self._log.pop(gallery, None)
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

    def fetch_items(self, gallery: str, image_ids: Sequence[str], fields: Sequence[str]
                    ) -> Chunk:
        with self._lock:
            stored = self._galleries.get(gallery, {})
            entries = [stored[i] for i in image_ids if i in stored]
        return [(item, {f: blobs[f] for f in fields if f in blobs}) for item, blobs in entries]

    def generation(self, gallery: str) -> Generation:
        with self._lock:
            entry = self._log.get(gallery)
        return entry[0] if entry else Generation("", 0)

    def changes_since(self, gallery: str, since: Generation
                      ) -> tuple[Generation, list[Change] | None]:
        with self._lock:
            now, changes = self._log.get(gallery) or (Generation("", 0), deque())
            if now == since:
                return now, []
            wanted = [c for c in changes if c.number > since.number]
        if (now.epoch != since.epoch
                or [c.number for c in wanted] != list(range(since.number + 1, now.number + 1))):
            return now, None
        return now, wanted

    def finish_deletions(self) -> int:
        return 0  # a deletion here is one step under the lock: nothing is ever half done

    def clear(self) -> None:
        with self._lock:
            self._galleries.clear()
            self._log.clear()

    def close(self) -> None:
        return None
