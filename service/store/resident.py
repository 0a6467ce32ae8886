"""Galleries kept resident in the scoring process, coherent with the store.

The store (Redis) stays the durable, shared source of truth; a query no longer streams a
whole gallery out of it. Each process keeps a gallery's cacheable tensors decoded, one
contiguous array per field (the cache dtype: float32, or float16 to halve them), plus the
unit-length embeddings that stage one of two-stage retrieval multiplies with the probe's.

Coherence: every write to a gallery advances its generation and logs the change in the same
store transaction (:meth:`GalleryStore.changes_since`). Before scoring, a query asks the store
for the changes since the generation it holds (one round trip when nothing changed), replays
them (fetching added items in one more), or reloads the gallery when they cannot be replayed
(deleted and created again, or too far behind). A write through any process is seen by the
next query in every other.

Memory: :class:`ResidentCache` keeps at most ``max_bytes`` of galleries, evicting whole
galleries least recently queried first; a gallery larger than the budget is not kept (its
queries stream it from the store as before).

Readers never block each other for long: a query takes a :class:`GalleryView`, a snapshot
that later writes do not change (rows are only appended past it, or the arrays replaced).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from model.retrieval import l2_normalise

from .base import Chunk, GalleryItem, GalleryStore, Generation
from .codec import TensorCodec, decode_entries

__all__ = ["GalleryView", "ResidentGallery", "ResidentCache", "SyncReport", "ArraysLayout",
           "ITEM_OVERHEAD"]

log = logging.getLogger(__name__)

# Bytes per resident item besides its arrays: the GalleryItem, its strings, its list slot and
# id -> row entry. Measured with tracemalloc for 10,000 items as uploads make them (no
# metadata): 491 bytes; rounded up for metadata and the views' list copies.
ITEM_OVERHEAD = 1024
_FETCH_CHUNK = 1024     # added items fetched per store round trip when replaying
_RELOAD_CHUNK = 1024    # items per store round trip when loading a whole gallery
_MAX_RELOADS = 3        # reload attempts in one sync when writes keep outrunning the load


@dataclass(frozen=True)
class GalleryView:
    """A resident gallery at one generation, for one query; later writes do not change it.

    Rows ``0 .. n-1``: ``items[i]`` (``None`` for a removed row), ``arrays[field]`` ``(n,
    *shape)`` in the cache dtype, ``unit_embedding`` ``(n, D)`` float32 of unit rows (``None``
    without an embedding field), ``alive`` ``(n,)`` bool, ``camera`` ``(n,)`` int32 codes of
    ``camera_codes``; ``layout``: stands for the arrays these rows are read from, the same
    object until the gallery's arrays are replaced (grown, compacted, reloaded), so that a
    reader may keep derived copies of them (the ranker's rows placed on a device) keyed by
    it, weakly: it is dropped with the arrays.
    """

    generation: Generation
    items: Sequence[GalleryItem | None]
    arrays: dict[str, np.ndarray]
    unit_embedding: np.ndarray | None
    alive: np.ndarray
    camera: np.ndarray
    camera_codes: dict[str, int]
    layout: ArraysLayout

    @property
    def size(self) -> int:
        """Live items."""
        return int(self.alive.sum())

    def camera_mask(self, only: Iterable[str] | None, excluded: Iterable[str]) -> np.ndarray:
        """``(n,)`` bool: live rows whose camera is in ``only`` (all when ``None``) and not in
        ``excluded``."""
        mask = self.alive.copy()
        if only is not None:
            codes = [self.camera_codes[c] for c in only if c in self.camera_codes]
            mask &= np.isin(self.camera, codes)
        codes = [self.camera_codes[c] for c in excluded if c in self.camera_codes]
        if codes:
            mask &= ~np.isin(self.camera, codes)
        return mask


class ArraysLayout:
    """A token for one set of a resident gallery's arrays (see :attr:`GalleryView.layout`);
    rows are only ever appended to it, or removed (``alive``), never moved."""

    __slots__ = ("__weakref__",)


@dataclass
class SyncReport:
    """What one sync did: ``fresh`` (nothing changed), ``replayed`` or ``reloaded``."""

    outcome: str
    changes: int = 0
    skipped: int = 0


class ResidentGallery:
    """One gallery's tensors in this process. ``codec``: the cache format (its required
    fields are loaded); ``embedding_field``: the field stage one ranks by, if any."""

    def __init__(self, name: str, codec: TensorCodec, embedding_field: str | None) -> None:
        self.name = name
        self.codec = codec
        self.fields = tuple(codec.required)
        self.embedding_field = embedding_field if embedding_field in self.fields else None
        self.lock = threading.Lock()
        self.generation = Generation("")
        self.loaded = False
        self._reset(0)

    # -- storage ------------------------------------------------------------------------------

    def _reset(self, capacity: int) -> None:
        dtype = np.dtype(self.codec.dtype)
        self._n = 0
        self._items: list[GalleryItem | None] = []
        self._row: dict[str, int] = {}
        self._arrays = {f: np.empty((capacity, *self.codec.spec[f]), dtype)
                        for f in self.fields}
        dim = self.codec.spec[self.embedding_field][0] if self.embedding_field else 0
        self._unit = np.empty((capacity, dim), np.float32) if self.embedding_field else None
        self._alive = np.zeros(capacity, bool)
        self._alive_shared = False  # a view holds rows of _alive: copy before clearing one
        self._camera = np.zeros(capacity, np.int32)
        self._created = np.zeros(capacity, np.float64)  # for the gallery's retention
        self._camera_codes: dict[str, int] = {}
        self._new_layout()

    def _new_layout(self) -> None:
        """The arrays were replaced (grown, compacted, reset): rows may have moved."""
        self._layout = ArraysLayout()

    @property
    def capacity(self) -> int:
        return len(self._alive)

    @property
    def nbytes(self) -> int:
        arrays = sum(a.nbytes for a in self._arrays.values()) + self._alive.nbytes
        arrays += self._camera.nbytes + self._created.nbytes
        arrays += self._unit.nbytes if self._unit is not None else 0
        return arrays + ITEM_OVERHEAD * len(self._items)

    def item_bytes(self) -> int:
        """Bytes one more item takes here (arrays at full capacity use, and overhead)."""
        per = sum(self.codec.item_bytes(f) for f in self.fields) + 1 + 4 + 8 + ITEM_OVERHEAD
        if self.embedding_field:
            per += 4 * self.codec.spec[self.embedding_field][0]
        return per

    def _grow(self, needed: int) -> None:
        """Room for ``needed`` rows. New arrays, never resized in place: views handed out
        keep reading the old ones."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, 64)
        n = self._n

        def grown(a: np.ndarray) -> np.ndarray:
            out = np.empty((capacity, *a.shape[1:]), a.dtype)  # rows >= n are never read
            out[:n] = a[:n]
            return out

        self._arrays = {f: grown(a) for f, a in self._arrays.items()}
        self._unit = grown(self._unit) if self._unit is not None else None
        self._alive, self._camera = grown(self._alive), grown(self._camera)
        self._created = grown(self._created)
        self._alive_shared = False
        self._new_layout()

    def append(self, items: list[GalleryItem], batch: dict[str, np.ndarray]) -> None:
        """Add items with their decoded tensors (``batch[field]`` ``(len(items), *shape)``,
        as the codec decodes them); an id already here is replaced. For loading and
        benchmarks: a synced gallery gets its items from the store."""
        for item in items:  # a re-added id replaces its old row
            self._remove(item.image_id)
        start, count = self._n, len(items)
        self._grow(start + count)
        end = start + count
        for f in self.fields:
            self._arrays[f][start:end] = batch[f]
        if self._unit is not None:
            self._unit[start:end] = l2_normalise(batch[self.embedding_field])
        self._alive[start:end] = True
        self._created[start:end] = [item.created_at for item in items]
        for k, item in enumerate(items):
            code = self._camera_codes.setdefault(item.camera_id, len(self._camera_codes))
            self._camera[start + k] = code
            self._row[item.image_id] = start + k
        self._items.extend(items)
        self._n = end

    def _remove(self, image_id: str) -> None:
        row = self._row.pop(image_id, None)
        if row is not None:
            if self._alive_shared:  # a view handed out keeps its rows as they were
                self._alive, self._alive_shared = self._alive.copy(), False
            self._alive[row] = False
            self._items[row] = None  # views hold a copy of the list

    def _compact(self) -> None:
        """Drop removed rows once they are a quarter of the gallery (new arrays)."""
        dead = self._n - len(self._row)
        if dead < max(256, self._n // 4):
            return
        keep = np.flatnonzero(self._alive[:self._n])
        self._arrays = {f: a[keep] for f, a in self._arrays.items()}
        self._unit = self._unit[keep] if self._unit is not None else None
        self._alive, self._camera = self._alive[keep], self._camera[keep]
        self._created = self._created[keep]
        self._alive_shared = False
        self._new_layout()
        self._items = [self._items[k] for k in keep]
        self._row = {item.image_id: k for k, item in enumerate(self._items)}
        self._n = len(keep)

    def _add_entries(self, chunk: Chunk) -> int:
        items, batch, skipped = decode_entries(self.codec, chunk, f"gallery {self.name}: ")
        if batch is not None:
            self.append(items, batch)
        return skipped

    # -- coherence ----------------------------------------------------------------------------

    def sync(self, store: GalleryStore) -> SyncReport:
        """Bring this copy to the store's generation (call under ``lock``)."""
        report = SyncReport("fresh")
        reloads = 0
        while True:
            now, changes = store.changes_since(self.name, self.generation)
            if changes is not None and self.loaded:
                if changes:
                    report.skipped += self._replay(store, changes)
                    report.changes += len(changes)
                    if report.outcome == "fresh":
                        report.outcome = "replayed"
                self.generation = now
                break
            if reloads == _MAX_RELOADS:  # writes outrun the load: serve what is loaded
                log.warning("gallery %s: still behind after %d reloads", self.name, reloads)
                break
            reloads += 1
            report.outcome = "reloaded"
            report.skipped += self._reload(store)
        self._compact()
        return report

    def _replay(self, store: GalleryStore, changes) -> int:
        pending: dict[str, None] = {}  # ids to fetch, in order; a later removal cancels
        for change in changes:
            for image_id in change.image_ids:
                pending.pop(image_id, None)
                if change.op == "remove":
                    self._remove(image_id)
                else:
                    pending[image_id] = None
        ids = list(pending)
        skipped = 0
        for k in range(0, len(ids), _FETCH_CHUNK):
            chunk = store.fetch_items(self.name, ids[k:k + _FETCH_CHUNK], self.fields)
            skipped += self._add_entries(chunk)
        return skipped

    def _reload(self, store: GalleryStore) -> int:
        """Load the whole gallery; the generation read first, so that replaying from it
        afterwards catches every write the scan may have missed (replays are idempotent).
        A scan that fails half-way (the store went away) leaves this copy unloaded: the next
        sync loads it again rather than replaying onto a partial copy."""
        self.loaded = False
        self.generation = Generation("")
        start = store.generation(self.name)
        self._reset(0)
        skipped = 0
        for chunk in store.iter_chunks(self.name, self.fields, _RELOAD_CHUNK):
            skipped += self._add_entries(chunk)
        self.generation, self.loaded = start, True
        return skipped

    def view(self, now: float | None = None) -> GalleryView:
        """A snapshot of the gallery. ``now``: the time by which items past the gallery's
        retention are left out (not yet purged from the store, or purged but not yet
        synced)."""
        n = self._n
        self._alive_shared = True
        alive = self._alive[:n]
        retention = self.generation.retention_s
        if retention is not None and now is not None:
            alive = alive & (self._created[:n] > now - retention)
        return GalleryView(
            generation=self.generation, items=self._items[:n],
            arrays={f: a[:n] for f, a in self._arrays.items()},
            unit_embedding=self._unit[:n] if self._unit is not None else None,
            alive=alive, camera=self._camera[:n],
            camera_codes=dict(self._camera_codes), layout=self._layout)


class ResidentCache:
    """Resident galleries of one store, within ``max_bytes`` (least recently queried
    evicted first). ``codec``: the engine's cache format; ``embedding_field``: stage one's
    field (``None``: no stage one)."""

    def __init__(self, codec: TensorCodec, max_bytes: int,
                 embedding_field: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.clock = clock  # the store's: expired items leave a view as they leave the store
        self.codec = codec
        self.max_bytes = int(max_bytes)
        self.embedding_field = embedding_field
        self._lock = threading.Lock()
        self._galleries: OrderedDict[str, ResidentGallery] = OrderedDict()
        # A running total, and each gallery's bytes as last counted: a query recounts only its
        # own gallery, so its cost does not grow with the number of resident galleries.
        self._bytes: dict[str, int] = {}
        self._total = 0

    def __len__(self) -> int:
        return len(self._galleries)

    @property
    def nbytes(self) -> int:
        return self._total

    def _forget(self, gallery: str) -> None:
        """Under ``_lock``: take ``gallery`` out of the cache and the total."""
        self._galleries.pop(gallery, None)
        self._total -= self._bytes.pop(gallery, 0)

    def view(self, store: GalleryStore, gallery: str, size_hint: int | None = None
             ) -> tuple[GalleryView | None, SyncReport]:
        """The gallery brought up to date, or ``None`` when it does not fit the budget (the
        caller streams it from the store). ``size_hint``: the gallery's size if known, so
        that a gallery too large is refused before it is loaded."""
        with self._lock:
            resident = self._galleries.get(gallery)
            if resident is None:
                resident = ResidentGallery(gallery, self.codec, self.embedding_field)
                if size_hint is not None and size_hint * resident.item_bytes() > self.max_bytes:
                    return None, SyncReport("bypassed")
                self._galleries[gallery] = resident
            self._galleries.move_to_end(gallery)
        with resident.lock:
            report = resident.sync(store)
            view = resident.view(now=self.clock())
            size = resident.nbytes
        if size > self.max_bytes:
            self.drop(gallery)
            return None, SyncReport("bypassed")
        with self._lock:
            if self._galleries.get(gallery) is resident:  # not dropped meanwhile
                self._total += size - self._bytes.get(gallery, 0)
                self._bytes[gallery] = size
        self._evict(keep=gallery)
        return view, report

    def drop(self, gallery: str) -> None:
        with self._lock:
            self._forget(gallery)

    def _evict(self, keep: str) -> None:
        """Least recently queried first, until the total fits: each step is O(1)."""
        with self._lock:
            while self._total > self.max_bytes and len(self._galleries) > 1:
                oldest = next(iter(self._galleries))
                if oldest == keep:
                    self._galleries.move_to_end(keep)
                    oldest = next(iter(self._galleries))
                    if oldest == keep:
                        break
                self._forget(oldest)
