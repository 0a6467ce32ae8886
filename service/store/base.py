"""The gallery store contract: named galleries of items, each with metadata and binary blobs.

A store is bound to one model id (its namespace): the activations of two models are never
mixed, because a store only sees the keys of its own model. Blobs are opaque bytes keyed by
field name (the engine's cached gallery fields, the thumbnail).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["GalleryItem", "NewItem", "Chunk", "checked_blobs", "GalleryStore", "StoreError",
           "StoreUnavailable", "new_image_id", "InvalidItem", "check_label", "check_metadata",
           "LABEL_MAX", "METADATA_MAX_DEPTH", "Generation", "Change", "CHANGE_OPS",
           "CHANGE_LOG_MAX", "GalleryConfig", "AddResult", "shard_of", "content_digest",
           "SHARDS_MAX", "check_gallery_settings", "checked_upload",
           "resolved_gallery_settings"]

LABEL_MAX = 128          # longest person_id / camera_id
METADATA_MAX_DEPTH = 16  # nesting levels of metadata (the top-level object is level 1)
_JSON_SCALARS = (str, int, float, bool, type(None))


class InvalidItem(ValueError):
    """An item's description breaks the rules every stored item keeps; the message says
    which field. Uploads refuse such items; readers skip a stored one as damaged."""


def check_label(name: str, value: object) -> str:
    """A person or camera id: 1 to ``LABEL_MAX`` printable characters (no control, format,
    e.g. NUL or bidirectional overrides, or separator characters other than the space)."""
    if not isinstance(value, str):
        raise InvalidItem(f"{name} must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= LABEL_MAX:
        raise InvalidItem(f"{name} must have 1 to {LABEL_MAX} characters, not {len(value)}")
    bad = next((ch for ch in value if not ch.isprintable()), None)
    if bad is not None:
        raise InvalidItem(f"{name} holds the unprintable character U+{ord(bad):04X}")
    return value


def check_metadata(value: object, max_depth: int = METADATA_MAX_DEPTH) -> dict[str, Any]:
    """Metadata: a JSON object of standard JSON (string keys, no NaN or infinities), nested
    at most ``max_depth`` levels. Walked without recursion, so any depth is answered."""
    if not isinstance(value, dict):
        raise InvalidItem(f"metadata must be a JSON object, not {type(value).__name__}")
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise InvalidItem(f"metadata is nested more than {max_depth} levels deep")
            if isinstance(node, dict):
                if not all(isinstance(k, str) for k in node):
                    raise InvalidItem("metadata keys must be strings")
                children = node.values()
            else:
                children = node
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(node, float) and not math.isfinite(node):
            raise InvalidItem("metadata holds NaN or an infinity, which JSON does not have")
        elif not isinstance(node, _JSON_SCALARS):
            raise InvalidItem(f"metadata holds a {type(node).__name__}, which is not JSON")
    return value


class StoreError(RuntimeError):
    """The store failed; the message says why."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (Redis down, timed out, refusing writes).

    ``str(exc)`` is for the log (address, exception); ``public`` is what a client may read:
    which kind of store and what failed, never where it is or how it failed inside."""

    def __init__(self, message: str, public: str = "the gallery store is unavailable") -> None:
        super().__init__(message)
        self.public = public


def new_image_id() -> str:
    return uuid.uuid4().hex


SHARDS_MAX = 64  # most shards of one gallery


def shard_of(image_id: str, shards: int) -> int:
    """The shard of a gallery of ``shards`` shards that holds ``image_id`` (stable across
    processes and versions: CRC-32 of the id)."""
    return zlib.crc32(image_id.encode()) % shards


def content_digest(image: bytes, person_id: str, camera_id: str,
                   metadata: dict[str, Any]) -> str:
    """What makes two uploads under one image id "the same content": the image file's bytes,
    its labels and metadata (hex SHA-256; metadata in canonical JSON)."""
    h = hashlib.sha256()
    for part in (image, person_id.encode(), camera_id.encode(),
                 json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def check_gallery_settings(shards: int, retention_days: float | None) -> None:
    """ValueError unless ``shards`` is 1..SHARDS_MAX and ``retention_days`` ``None`` or a
    positive finite number."""
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= SHARDS_MAX:
        raise ValueError(f"shards must be an integer from 1 to {SHARDS_MAX}, not {shards!r}")
    if retention_days is not None and (
            isinstance(retention_days, bool) or not isinstance(retention_days, (int, float))
            or not math.isfinite(retention_days) or retention_days <= 0):
        raise ValueError(f"retention_days must be a positive number, not {retention_days!r}")


def resolved_gallery_settings(shards: int | None, retention_days: float | None,
                              default_shards: int, default_retention_days: float | None
                              ) -> tuple[int, float | None]:
    """The settings a gallery is created with: each one asked for, else the store's default;
    checked (:func:`check_gallery_settings`)."""
    shards = default_shards if shards is None else shards
    if retention_days is None:
        retention_days = default_retention_days
    check_gallery_settings(shards, retention_days)
    return shards, retention_days


@dataclass(frozen=True)
class GalleryConfig:
    """A gallery's settings, fixed when it is created. ``shards``: how many parts its items
    are split into (each on its own Redis slot, so over a cluster's nodes); ``retention_days``:
    items older than this are gone (``None``: kept until deleted); ``epoch``: drawn at
    creation, so that a gallery deleted and created again is another incarnation."""

    shards: int
    retention_days: float | None
    epoch: str
    created_at: float

    @property
    def retention_s(self) -> float | None:
        return None if self.retention_days is None else self.retention_days * 86400.0


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

    def check(self) -> GalleryItem:
        """Raise :class:`InvalidItem` unless every field keeps the rules of a stored item."""
        check_label("person_id", self.person_id)
        check_label("camera_id", self.camera_id)
        check_metadata(self.metadata)
        if not isinstance(self.image_id, str) or not self.image_id:
            raise InvalidItem("image_id must be a non-empty string")
        if self.filename is not None and not isinstance(self.filename, str):
            raise InvalidItem("filename must be a string")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise InvalidItem(f"{name} must be an integer")
        if not isinstance(self.created_at, (int, float)) or not math.isfinite(self.created_at):
            raise InvalidItem("created_at must be a finite number")
        return self

    def to_json(self) -> bytes:
        """The stored form: checked, standard JSON (``InvalidItem`` if it cannot be)."""
        self.check()
        return json.dumps(asdict(self), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> GalleryItem:
        """Parse and check a stored form; ``ValueError`` (or ``InvalidItem``) if damaged."""
        try:
            fields = json.loads(data)
        except RecursionError as exc:
            raise InvalidItem("entry nested too deeply to read") from exc
        if not isinstance(fields, dict):
            raise InvalidItem("entry is not a JSON object")
        return cls(**fields).check()


@dataclass(frozen=True)
class NewItem:
    """An item to store: its description, its blobs (field name -> bytes) and the digest of
    its content (:func:`content_digest`): an item stored again under its id with the same
    digest is left as it is, with another digest refused."""

    item: GalleryItem
    blobs: Mapping[str, bytes]
    digest: str = ""


@dataclass(frozen=True)
class AddResult:
    """What an upload did: ``size`` of the gallery afterwards; ``added``: the items stored
    now; ``existing``: those already stored under their ids with the same content (left as
    they were, returned as stored); ``conflicts``: ids already stored with other content
    (then nothing of the upload was stored)."""

    size: int | None  # None: not countable just now (a node failing over)
    added: list[GalleryItem]
    existing: list[GalleryItem]
    conflicts: list[str] = field(default_factory=list)


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

# Changes a store keeps per gallery for readers that cache it (about; Redis trims lazily).
# A reader further behind reloads the gallery instead of replaying.
CHANGE_LOG_MAX = 10_000
CHANGE_OPS = ("add", "remove")


@dataclass(frozen=True)
class Generation:
    """Where a gallery stands: ``numbers[s]`` counts the writes to shard ``s`` (``()``: no
    such gallery); ``epoch`` is drawn when the gallery is created, so that a gallery deleted
    and created again (or a store cleared) never repeats an earlier generation;
    ``retention_s``: the gallery's retention in seconds (fixed for an epoch), so that a
    reader drops expired items by itself."""

    epoch: str
    numbers: tuple[int, ...] = ()
    retention_s: float | None = None

    @property
    def number(self) -> int:
        """Writes to the gallery, all shards together."""
        return sum(self.numbers)


@dataclass(frozen=True)
class Change:
    """One write to one shard of a gallery: the items it added or removed, and the number
    it made (``Generation.numbers[shard]``)."""

    number: int
    op: str  # one of CHANGE_OPS
    image_ids: tuple[str, ...]
    shard: int = 0


@runtime_checkable
class GalleryStore(Protocol):
    """What the service needs from a gallery store. Every method may raise
    :class:`StoreUnavailable`; none loads a whole gallery's blobs at once.

    Expired items (older than their gallery's retention, by the store's ``clock``) are absent
    from every read at once, whether or not :meth:`purge_expired` has removed them yet."""

    kind: str          # "redis" or "memory"
    persistent: bool   # whether galleries survive a restart of the service
    namespace: str     # the model id whose galleries this store holds
    default_shards: int                 # shards of a gallery created without a setting
    default_retention_days: float | None

    def ping(self) -> None:
        """Return if the store answers, raise :class:`StoreUnavailable` otherwise."""

    def create_gallery(self, gallery: str, shards: int | None = None,
                       retention_days: float | None = None) -> tuple[GalleryConfig, bool]:
        """Create ``gallery`` (settings ``None``: the store's defaults) -> (its config,
        whether it was created now). An existing gallery is left as it is and returned; the
        caller compares settings (:class:`service.domain.GalleryConflict`)."""

    def gallery_config(self, gallery: str) -> GalleryConfig | None: ...

    def add_items(self, gallery: str, items: Sequence[NewItem]) -> AddResult:
        """Store ``items`` in ``gallery`` (created with the defaults if new). Per shard all
        at once: an id already stored with the same digest is left as it is
        (``existing``); one stored with another digest is a conflict, and then nothing is
        stored (checked on every shard before any is written). Before any write: TypeError
        for a blob that is not bytes, :class:`InvalidItem` for a description that breaks
        :meth:`GalleryItem.check` or an id given twice."""

    def gallery_size(self, gallery: str) -> int | None:
        """Number of live items, or ``None`` if there is no such gallery."""

    def list_galleries(self) -> dict[str, int]:
        """Gallery name -> size, sorted by name."""

    def list_items(self, gallery: str, offset: int, limit: int
                   ) -> tuple[int, list[GalleryItem]] | None:
        """(total, items ``offset`` .. ``offset + limit - 1`` in insertion order), or ``None``
        if there is no such gallery. Across shards, insertion order is the order of the
        store clock's time (microseconds) at each upload, an upload's items in its order."""

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
        """The gallery's items with these blob fields, ``chunk_size`` at a time, shard by
        shard, each shard in insertion order. Items deleted during the scan may be left out;
        an item lacking one of the fields is given without it."""

    def fetch_items(self, gallery: str, image_ids: Sequence[str], fields: Sequence[str]
                    ) -> Chunk:
        """These items with these blob fields, in the order asked, in one round trip (per
        node); items that are not (or no longer) in the gallery, or damaged, are left out."""

    def generation(self, gallery: str) -> Generation:
        """The gallery's generation (``Generation("")`` when there is no such gallery).
        Every write that changes a shard advances its number in the same transaction."""

    def changes_since(self, gallery: str, since: Generation
                      ) -> tuple[Generation, list[Change] | None]:
        """(the generation now, the changes after ``since``, each shard's in order). The
        list is ``None`` when they cannot be replayed: another epoch (the gallery was
        deleted since, or no longer exists) or a shard more than ``CHANGE_LOG_MAX`` changes
        behind; the reader then reloads the gallery."""

    def purge_expired(self) -> int:
        """Remove the items past their gallery's retention (logged as removals, so that
        resident copies drop them too) -> how many were removed."""

    def finish_deletions(self) -> int:
        """Finish gallery deletions that a stopped process left half done (their galleries
        are already gone; their items are removed now) -> how many were finished."""

    def clear(self) -> None:
        """Delete everything this store wrote under its namespace (and nothing else)."""

    def close(self) -> None: ...


def checked_upload(items: Sequence[NewItem]) -> list[tuple[NewItem, bytes, dict[str, bytes]]]:
    """Each item with its stored description (checked) and its blobs as bytes: everything a
    store checks before it writes anything (:meth:`GalleryStore.add_items`)."""
    seen: set[str] = set()
    for new in items:
        if new.item.image_id in seen:
            raise InvalidItem(f"image id {new.item.image_id} is given twice in one upload")
        seen.add(new.item.image_id)
    metas = [new.item.to_json() for new in items]
    return list(zip(items, metas, checked_blobs(items), strict=True))
