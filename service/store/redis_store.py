"""The gallery store in Redis.

Keys, all under ``{prefix}{namespace}:`` (the namespace is the model id, so that the
activations of two models never mix):

- ``galleries``: set of gallery names;
- ``seq``: counter giving each stored item its insertion number;
- ``g:{gallery}``: sorted set of the gallery's image ids, scored by insertion number;
- ``i:{gallery}:{image_id}``: hash with ``meta`` (the item's JSON description) and one
  ``b:{field}`` entry per blob (the conv5 map, the engine's cached gallery tensors);
- ``gen:{gallery}``: hash with the gallery's generation, ``epoch`` (drawn when the gallery is
  created) and ``n`` (writes so far);
- ``log:{gallery}``: stream of the gallery's last writes (``n``, ``op``, ``ids`` as a JSON
  list), about ``CHANGE_LOG_MAX`` long, read by processes that keep the gallery resident;
- ``trash:{uuid}:{gallery}``: a deleted gallery's id set while its items are being removed;
  one left by a stopped process is finished by :meth:`RedisGalleryStore.finish_deletions`
  (the service calls it at start).

An upload is one MULTI/EXEC transaction, and so is a deletion; both advance the generation
and append to the change stream inside it (small Lua scripts), so a reader that sees a
generation sees every write before it. A scan walks the sorted set by insertion number
(a cursor that concurrent writes cannot shift) and fetches each chunk's hashes in one
pipeline. ``clear`` deletes only keys under the store's own prefix and namespace.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .base import (
    CHANGE_LOG_MAX,
    Change,
    Chunk,
    GalleryItem,
    Generation,
    NewItem,
    StoreUnavailable,
    checked_blobs,
)

__all__ = ["RedisGalleryStore"]

log = logging.getLogger(__name__)


def _glob_escape(key: bytes) -> bytes:
    """``key`` with Redis glob characters escaped, to match it literally in SCAN."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", key)

_META = b"meta"
_DRAIN_CHUNK = 500

# KEYS[1] the gallery's gen hash, KEYS[2] its change stream. Run inside the write's own
# transaction (or script), so the generation never runs ahead of or behind the data.
_LOG_LUA = """
local function log(gen, stream, new_epoch, op, ids, maxlen)
  redis.call('HSETNX', gen, 'epoch', new_epoch)
  local n = redis.call('HINCRBY', gen, 'n', 1)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'n', n, 'op', op, 'ids', ids)
  return n
end
"""
# ARGV: new epoch, ids (JSON), stream length.
_ADD_LUA = _LOG_LUA + "return log(KEYS[1], KEYS[2], ARGV[1], 'add', ARGV[2], ARGV[3])"
# KEYS[3] the id set, KEYS[4] the item hash; ARGV[4] the image id. Nothing is logged (nor
# any key created) when the item is not there: deleting unknown names leaves no trace.
_REMOVE_LUA = _LOG_LUA + """
if redis.call('ZREM', KEYS[3], ARGV[4]) == 0 then return 0 end
redis.call('DEL', KEYS[4])
log(KEYS[1], KEYS[2], ARGV[1], 'remove', ARGV[2], ARGV[3])
return 1
"""
# ARGV: the reader's epoch and number, the most changes worth replaying. Returns
# {epoch, n, newest-first entries} (no entries when they cannot or need not be replayed).
_CHANGES_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return {'', 0, {}} end
local n = tonumber(redis.call('HGET', KEYS[1], 'n'))
local behind = n - tonumber(ARGV[2])
if epoch ~= ARGV[1] or behind <= 0 or behind > tonumber(ARGV[3]) then
  return {epoch, n, {}}
end
return {epoch, n, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', behind)}
"""


def _blob_key(field: str) -> bytes:
    return b"b:" + field.encode()


def _describe(url: str) -> str:
    # Never put a password into logs or error messages.
    return re.sub(r"//[^@/]*@", "//***@", url)


def _parse_meta(raw: bytes | None, key: bytes) -> GalleryItem | None:
    """An item's description, or ``None`` (logged) when it is missing or unreadable: a
    damaged entry is left out rather than failing every request that touches it."""
    if raw is None:
        return None
    try:
        return GalleryItem.from_json(raw)
    except (ValueError, TypeError) as exc:
        log.warning("skipping unreadable gallery entry %r: %s", key, exc)
        return None


@contextmanager
def _guard(what: str, url: str):
    try:
        yield
    except redis.RedisError as exc:
        raise StoreUnavailable(f"redis at {_describe(url)} failed to {what}: "
                               f"{type(exc).__name__}: {exc}",
                               public=f"redis failed to {what}; retry later") from exc


class RedisGalleryStore:
    """Galleries in Redis under ``prefix + namespace + ":"``.

    ``url``: a ``redis://`` URL (a database number in its path picks the database);
    ``client``: an existing client instead (the URL is then only used in messages).
    """

    kind = "redis"
    persistent = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", namespace: str = "default",
                 prefix: str = "dsmi:", socket_timeout: float = 1.0,
                 connect_timeout: float = 0.5, client: redis.Redis | None = None) -> None:
        if not namespace or not prefix:
            raise ValueError("prefix and namespace must not be empty")
        self.url = url
        self.namespace = namespace
        self.prefix = prefix
        self._base = f"{prefix}{namespace}:".encode()
        self._owns_client = client is None
        # One quick retry, for a dropped connection only: a dead server must turn into a 503
        # in about a second, and the pool reconnects by itself once the server is back. A
        # timeout is not retried: a hung server (stopped, not dead) would double the wait.
        self.client = client or redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), retries=1,
                        supported_errors=(redis.ConnectionError,)),
            retry_on_timeout=False, health_check_interval=15)

    # -- keys ---------------------------------------------------------------------------
    def _key(self, *parts: str) -> bytes:
        return self._base + ":".join(parts).encode()

    def _galleries_key(self) -> bytes:
        return self._key("galleries")

    def _ids_key(self, gallery: str) -> bytes:
        return self._key("g", gallery)

    def _item_key(self, gallery: str, image_id: str | bytes) -> bytes:
        if isinstance(image_id, bytes):
            image_id = image_id.decode()
        return self._key("i", gallery, image_id)

    def _gen_keys(self, gallery: str) -> tuple[bytes, bytes]:
        return self._key("gen", gallery), self._key("log", gallery)

    def _guard(self, what: str):
        return _guard(what, self.url)

    # -- contract -----------------------------------------------------------------------
    def ping(self) -> None:
        with self._guard("answer PING"):
            self.client.ping()

    def add_items(self, gallery: str, items: Sequence[NewItem]) -> int:
        blobs = checked_blobs(items)
        metas = [new.item.to_json() for new in items]  # checked before anything is written
        with self._guard("store the upload"):
            if not items:
                return self.gallery_size(gallery) or 0
            last = self.client.incrby(self._key("seq"), len(items))
            first = last - len(items) + 1
            pipe = self.client.pipeline(transaction=True)
            pipe.sadd(self._galleries_key(), gallery)
            pipe.zadd(self._ids_key(gallery),
                      {new.item.image_id: first + k for k, new in enumerate(items)})
            for new, meta, item_blobs in zip(items, metas, blobs, strict=True):
                mapping = {_META: meta}
                mapping.update({_blob_key(f): v for f, v in item_blobs.items()})
                pipe.hset(self._item_key(gallery, new.item.image_id), mapping=mapping)
            ids = json.dumps([new.item.image_id for new in items])
            pipe.eval(_ADD_LUA, 2, *self._gen_keys(gallery), uuid.uuid4().hex, ids,
                      CHANGE_LOG_MAX)
            pipe.zcard(self._ids_key(gallery))
            return int(pipe.execute()[-1])

    def gallery_size(self, gallery: str) -> int | None:
        with self._guard("read the gallery size"):
            pipe = self.client.pipeline(transaction=False)
            pipe.sismember(self._galleries_key(), gallery)
            pipe.zcard(self._ids_key(gallery))
            exists, size = pipe.execute()
        return int(size) if exists else None

    def list_galleries(self) -> dict[str, int]:
        with self._guard("list the galleries"):
            names = sorted(n.decode() for n in self.client.smembers(self._galleries_key()))
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.zcard(self._ids_key(name))
            sizes = pipe.execute() if names else []
        return dict(zip(names, (int(s) for s in sizes), strict=True))

    def list_items(self, gallery: str, offset: int, limit: int
                   ) -> tuple[int, list[GalleryItem]] | None:
        with self._guard("list the gallery"):
            pipe = self.client.pipeline(transaction=False)
            pipe.sismember(self._galleries_key(), gallery)
            pipe.zcard(self._ids_key(gallery))
            pipe.zrange(self._ids_key(gallery), offset, offset + limit - 1)
            exists, total, ids = pipe.execute()
            if not exists:
                return None
            pipe = self.client.pipeline(transaction=False)
            for image_id in ids:
                pipe.hget(self._item_key(gallery, image_id), _META)
            metas = pipe.execute() if ids else []
        parsed = (_parse_meta(m, self._item_key(gallery, i)) for m, i in zip(metas, ids,
                                                                              strict=True))
        return int(total), [item for item in parsed if item is not None]

    def get_item(self, gallery: str, image_id: str) -> GalleryItem | None:
        with self._guard("read the item"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zscore(self._ids_key(gallery), image_id)
            pipe.hget(self._item_key(gallery, image_id), _META)
            listed, meta = pipe.execute()
        if listed is None:
            return None
        return _parse_meta(meta, self._item_key(gallery, image_id))

    def get_blobs(self, gallery: str, image_id: str, fields: Sequence[str]
                  ) -> dict[str, bytes] | None:
        with self._guard("read the item"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zscore(self._ids_key(gallery), image_id)
            pipe.hmget(self._item_key(gallery, image_id), [_blob_key(f) for f in fields])
            listed, values = pipe.execute()
        if listed is None:
            return None
        return {f: v for f, v in zip(fields, values, strict=True) if v is not None}

    def delete_item(self, gallery: str, image_id: str) -> bool:
        with self._guard("delete the item"):
            removed = self.client.eval(
                _REMOVE_LUA, 4, *self._gen_keys(gallery), self._ids_key(gallery),
                self._item_key(gallery, image_id), uuid.uuid4().hex, json.dumps([image_id]),
                CHANGE_LOG_MAX, image_id)
        return bool(removed)

    def delete_gallery(self, gallery: str) -> int | None:
        ids_key = self._ids_key(gallery)
        # The gallery's name is in the key: a sweep after a crash knows whose items to remove.
        trash = self._key("trash", uuid.uuid4().hex, gallery)

        def detach(pipe: redis.client.Pipeline) -> tuple[bool, int]:
            exists = pipe.sismember(self._galleries_key(), gallery)
            size = pipe.zcard(ids_key)
            pipe.multi()
            pipe.srem(self._galleries_key(), gallery)
            # A new gallery of this name gets a new epoch: readers reload, never replay.
            pipe.delete(*self._gen_keys(gallery))
            if size:
                pipe.rename(ids_key, trash)
            return bool(exists), int(size)

        with self._guard("delete the gallery"):
            # The gallery disappears at once (one transaction moves its id set aside); its
            # item hashes are removed afterwards, a chunk at a time.
            exists, size = self.client.transaction(detach, ids_key, value_from_callable=True)
            if size:
                self._drain(gallery, trash)
        return size if exists else None

    def finish_deletions(self) -> int:
        finished = 0
        start = len(self._key("trash", ""))
        with self._guard("finish interrupted deletions"):
            pattern = _glob_escape(self._key("trash", "")) + b"*"
            for key in self.client.scan_iter(match=pattern, count=500):
                _, _, gallery = key[start:].decode().partition(":")  # "{uuid}:{gallery}"
                if not gallery:
                    continue
                self._drain(gallery, key)
                finished += 1
        if finished:
            log.warning("finished %d gallery deletion(s) that a stopped process left half "
                        "done", finished)
        return finished

    def _drain(self, gallery: str, ids_key: bytes) -> None:
        while True:
            ids = self.client.zrange(ids_key, 0, _DRAIN_CHUNK - 1)
            if not ids:
                break
            pipe = self.client.pipeline(transaction=False)
            pipe.unlink(*(self._item_key(gallery, i) for i in ids))
            pipe.zrem(ids_key, *ids)
            pipe.execute()
        self.client.delete(ids_key)

    def iter_chunks(self, gallery: str, fields: Sequence[str], chunk_size: int
                    ) -> Iterator[Chunk]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        wanted = [_META] + [_blob_key(f) for f in fields]
        cursor: str | float = "-inf"
        while True:
            with self._guard("read the gallery"):
                rows = self.client.zrange(self._ids_key(gallery), cursor, "+inf", byscore=True,
                                          offset=0, num=chunk_size, withscores=True)
                if not rows:
                    return
                pipe = self.client.pipeline(transaction=False)
                for image_id, _ in rows:
                    pipe.hmget(self._item_key(gallery, image_id), wanted)
                values = pipe.execute()
            chunk = self._chunk(gallery, [image_id for image_id, _ in rows], values, fields)
            if chunk:
                yield chunk
            cursor = f"({int(rows[-1][1])}"

    def fetch_items(self, gallery: str, image_ids: Sequence[str], fields: Sequence[str]
                    ) -> Chunk:
        image_ids = list(image_ids)
        if not image_ids:
            return []
        wanted = [_META] + [_blob_key(f) for f in fields]
        with self._guard("read the items"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zmscore(self._ids_key(gallery), image_ids)
            for image_id in image_ids:
                pipe.hmget(self._item_key(gallery, image_id), wanted)
            listed, *rows = pipe.execute()
        # An item hash can outlive its listing while a deleted gallery is being drained.
        kept = [(i, row) for i, row, score in zip(image_ids, rows, listed, strict=True)
                if score is not None]
        return self._chunk(gallery, [i for i, _ in kept], [row for _, row in kept], fields)

    def _chunk(self, gallery: str, image_ids: Sequence[str | bytes], rows: Sequence[list],
               fields: Sequence[str]) -> Chunk:
        """HMGET rows (meta, then the fields) -> a chunk; an item whose meta is gone (deleted
        since its id was read) or damaged (logged) is left out."""
        chunk: Chunk = []
        for image_id, row in zip(image_ids, rows, strict=True):
            item = _parse_meta(row[0], self._item_key(gallery, image_id))
            if item is not None:
                chunk.append((item, {f: v for f, v in zip(fields, row[1:], strict=True)
                                     if v is not None}))
        return chunk

    def generation(self, gallery: str) -> Generation:
        with self._guard("read the gallery generation"):
            epoch, number = self.client.hmget(self._gen_keys(gallery)[0], [b"epoch", b"n"])
        return Generation(epoch.decode() if epoch else "", int(number or 0))

    def changes_since(self, gallery: str, since: Generation
                      ) -> tuple[Generation, list[Change] | None]:
        with self._guard("read the gallery changes"):
            epoch, number, entries = self.client.eval(
                _CHANGES_LUA, 2, *self._gen_keys(gallery), since.epoch, since.number,
                CHANGE_LOG_MAX)
        now = Generation(epoch.decode() if isinstance(epoch, bytes) else str(epoch or ""),
                         int(number))
        if now == since:
            return now, []
        if now.epoch != since.epoch or now.number < since.number:
            return now, None
        changes = []
        for _, fields in reversed(entries):
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            try:
                changes.append(Change(int(values[b"n"]), values[b"op"].decode(),
                                      tuple(json.loads(values[b"ids"]))))
            except (KeyError, ValueError, TypeError):
                log.warning("gallery %s: unreadable change record %r", gallery, values)
                return now, None
        # The stream is trimmed lazily and may have lost the oldest entries asked for.
        if [c.number for c in changes] != list(range(since.number + 1, now.number + 1)):
            return now, None
        return now, changes

    def clear(self) -> None:
        pattern = _glob_escape(self._base) + b"*"
        with self._guard("clear the namespace"):
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    self.client.unlink(*batch)
                    batch.clear()
            if batch:
                self.client.unlink(*batch)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
