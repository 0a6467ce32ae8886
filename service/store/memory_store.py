"""An in-process gallery store for trying the service out: nothing survives a restart.

It keeps the contract of the Redis store exactly (shards, generations, change logs,
idempotent uploads, retention), so that the same contract tests run against both."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .base import (
    CHANGE_LOG_MAX,
    AddResult,
    Change,
    Chunk,
    GalleryConfig,
    GalleryItem,
    Generation,
    NewItem,
    check_gallery_settings,
    checked_upload,
    resolved_gallery_settings,
    shard_of,
)

__all__ = ["MemoryGalleryStore"]


@dataclass
class _Shard:
    # image_id -> (item, blobs, digest, insertion number); dicts keep insertion order.
    entries: dict[str, tuple[GalleryItem, dict[str, bytes], str, int]] = field(
        default_factory=dict)
    number: int = 0
    log: deque = field(default_factory=lambda: deque(maxlen=CHANGE_LOG_MAX))


@dataclass
class _Gallery:
    config: GalleryConfig
    shards: list[_Shard]
    order: int = 0  # insertion counter across shards, for listings


class MemoryGalleryStore:
    """Galleries in dicts, guarded by one lock (uploads are all or nothing under it).
    ``clock``: the time retention is measured by (``time.time``; tests pass their own)."""

    kind = "memory"
    persistent = False

    def __init__(self, namespace: str = "default", default_shards: int = 1,
                 default_retention_days: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        check_gallery_settings(default_shards, default_retention_days)
        self.namespace = namespace
        self.default_shards = default_shards
        self.default_retention_days = default_retention_days
        self.clock = clock
        self._lock = threading.RLock()
        self._galleries: dict[str, _Gallery] = {}

    # -- helpers (under the lock) ---------------------------------------------------------
    def _live(self, g: _Gallery, item: GalleryItem) -> bool:
        retention = g.config.retention_s
        return retention is None or item.created_at > self.clock() - retention

    def _record(self, g: _Gallery, s: int, op: str, image_ids: Sequence[str]) -> None:
        shard = g.shards[s]
        shard.number += 1
        shard.log.append(Change(shard.number, op, tuple(image_ids), s))

    def _generation(self, g: _Gallery | None) -> Generation:
        if g is None:
            return Generation("")
        return Generation(g.config.epoch, tuple(sh.number for sh in g.shards),
                          g.config.retention_s)

    def _entry(self, gallery: str, image_id: str):
        g = self._galleries.get(gallery)
        if g is None:
            return None
        entry = g.shards[shard_of(image_id, g.config.shards)].entries.get(image_id)
        return entry if entry is not None and self._live(g, entry[0]) else None

    def _live_entries(self, g: _Gallery) -> list[tuple[GalleryItem, dict[str, bytes], str, int]]:
        return [e for sh in g.shards for e in sh.entries.values() if self._live(g, e[0])]

    # -- contract -------------------------------------------------------------------------
    def ping(self) -> None:
        return None

    def create_gallery(self, gallery: str, shards: int | None = None,
                       retention_days: float | None = None) -> tuple[GalleryConfig, bool]:
        shards, retention_days = resolved_gallery_settings(
            shards, retention_days, self.default_shards, self.default_retention_days)
        with self._lock:
            g = self._galleries.get(gallery)
            if g is not None:
                return g.config, False
            config = GalleryConfig(shards, retention_days, uuid.uuid4().hex, self.clock())
            self._galleries[gallery] = _Gallery(config, [_Shard() for _ in range(shards)])
            return config, True

    def gallery_config(self, gallery: str) -> GalleryConfig | None:
        with self._lock:
            g = self._galleries.get(gallery)
            return None if g is None else g.config

    def add_items(self, gallery: str, items: Sequence[NewItem]) -> AddResult:
        # Check and copy first, then insert under the lock: nothing can fail half-way.
        checked = checked_upload(items)
        with self._lock:
            self.create_gallery(gallery)
            g = self._galleries[gallery]
            existing, conflicts, fresh = [], [], []
            for new, _, blobs in checked:
                entry = self._entry(gallery, new.item.image_id)
                if entry is None:
                    fresh.append((new, blobs))
                elif entry[2] == new.digest:
                    existing.append(entry[0])
                else:
                    conflicts.append(new.item.image_id)
            if conflicts:
                return AddResult(self.gallery_size(gallery) or 0, [], [], conflicts)
            by_shard: dict[int, list[str]] = {}
            now = self.clock()  # the store's time: retention is measured by its clock
            added = [dataclasses.replace(new.item, created_at=now) for new, _ in fresh]
            for item, (new, blobs) in zip(added, fresh, strict=True):
                s = shard_of(item.image_id, g.config.shards)
                entries = g.shards[s].entries
                entries.pop(item.image_id, None)  # an expired one, not yet purged
                g.order += 1
                entries[item.image_id] = (item, blobs, new.digest, g.order)
                by_shard.setdefault(s, []).append(item.image_id)
            for s, ids in by_shard.items():
                self._record(g, s, "add", ids)
            return AddResult(self.gallery_size(gallery) or 0, added, existing)

    def gallery_size(self, gallery: str) -> int | None:
        with self._lock:
            g = self._galleries.get(gallery)
            if g is None:
                return None
            if g.config.retention_s is None:  # every stored item is live: no scan per query
                return sum(len(sh.entries) for sh in g.shards)
            return len(self._live_entries(g))

    def list_galleries(self) -> dict[str, int]:
        with self._lock:
            return {name: self.gallery_size(name) or 0 for name in sorted(self._galleries)}

    def list_items(self, gallery: str, offset: int, limit: int
                   ) -> tuple[int, list[GalleryItem]] | None:
        with self._lock:
            g = self._galleries.get(gallery)
            if g is None:
                return None
            entries = sorted(self._live_entries(g), key=lambda e: e[3])
        return len(entries), [e[0] for e in entries[offset:offset + limit]]

    def get_item(self, gallery: str, image_id: str) -> GalleryItem | None:
        with self._lock:
            entry = self._entry(gallery, image_id)
        return None if entry is None else entry[0]

    def get_blobs(self, gallery: str, image_id: str, fields: Sequence[str]
                  ) -> dict[str, bytes] | None:
        with self._lock:
            entry = self._entry(gallery, image_id)
        if entry is None:
            return None
        return {f: entry[1][f] for f in fields if f in entry[1]}

    def delete_item(self, gallery: str, image_id: str) -> bool:
        with self._lock:
            if self._entry(gallery, image_id) is None:
                return False
            g = self._galleries[gallery]
            s = shard_of(image_id, g.config.shards)
            del g.shards[s].entries[image_id]
            self._record(g, s, "remove", [image_id])
            return True

    def delete_gallery(self, gallery: str) -> int | None:
        with self._lock:
            size = self.gallery_size(gallery)
            self._galleries.pop(gallery, None)
        return size

    def iter_chunks(self, gallery: str, fields: Sequence[str], chunk_size: int
                    ) -> Iterator[Chunk]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        with self._lock:
            g = self._galleries.get(gallery)
            ids = [i for sh in g.shards for i in sh.entries] if g is not None else []
        for start in range(0, len(ids), chunk_size):
            chunk: Chunk = []
            with self._lock:
                for image_id in ids[start:start + chunk_size]:
                    entry = self._entry(gallery, image_id)
                    if entry is not None:  # deleted since the scan began
                        chunk.append((entry[0], {f: entry[1][f] for f in fields
                                                 if f in entry[1]}))
            if chunk:
                yield chunk

    def fetch_items(self, gallery: str, image_ids: Sequence[str], fields: Sequence[str]
                    ) -> Chunk:
        with self._lock:
            entries = [e for e in (self._entry(gallery, i) for i in image_ids) if e is not None]
        return [(item, {f: blobs[f] for f in fields if f in blobs})
                for item, blobs, _, _ in entries]

    def generation(self, gallery: str) -> Generation:
        with self._lock:
            return self._generation(self._galleries.get(gallery))

    def changes_since(self, gallery: str, since: Generation
                      ) -> tuple[Generation, list[Change] | None]:
        with self._lock:
            g = self._galleries.get(gallery)
            now = self._generation(g)
            if now == since:
                return now, []
            if g is None or now.epoch != since.epoch or len(since.numbers) != len(g.shards):
                return now, None
            wanted = []
            for s, shard in enumerate(g.shards):
                after = [c for c in shard.log if c.number > since.numbers[s]]
                if [c.number for c in after] != list(range(since.numbers[s] + 1,
                                                           shard.number + 1)):
                    return now, None
                wanted.extend(after)
        return now, wanted

    def purge_expired(self) -> int:
        removed = 0
        with self._lock:
            for g in self._galleries.values():
                if g.config.retention_s is None:
                    continue
                for s, shard in enumerate(g.shards):
                    gone = [i for i, e in shard.entries.items() if not self._live(g, e[0])]
                    for image_id in gone:
                        del shard.entries[image_id]
                    if gone:
                        self._record(g, s, "remove", gone)
                        removed += len(gone)
        return removed

    def finish_deletions(self) -> int:
        return 0  # a deletion here is one step under the lock: nothing is ever half done

    def clear(self) -> None:
        with self._lock:
            self._galleries.clear()

    def close(self) -> None:
        return None
