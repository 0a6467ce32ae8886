"""The gallery store in Redis: one server, or a Redis Cluster.

Keys, all under ``B = {prefix}{namespace}:`` (the namespace is the model id, so that the
activations of two models never mix). A gallery is split into shards; every key of one shard
carries the shard's hash tag ``{T}`` (``T`` = ``gallery/s.k``, ``k`` picked at creation so that
the shards' slots spread evenly over the 16,384: with a cluster's usual contiguous slot
ranges, N shards of a gallery land on N masters), so that every write touches one slot and
runs as one Lua script there:

- ``B{gallery}:conf``: hash ``shards``, ``retention`` (seconds, or empty), ``epoch``,
  ``created``, ``tags`` (JSON list of the shards' tags): the gallery exists while it does;
- ``Bregistry``: set of gallery names, for listings: written when a gallery is created or
  deleted (a write of its own, after the conf key's), never by an upload; a name whose conf
  key is gone is left out, and one missing (a process stopped between the two writes) is
  added back by a scan for ``B{*}:conf`` at start (:meth:`finish_deletions`);
- ``B{T}:E:ids``: sorted set of the shard's image ids, scored by insertion time in
  microseconds (the store's clock, made strictly increasing per shard by the script), for
  epoch ``E`` (a gallery deleted and created again uses new keys);
- ``B{T}:E:i:{image_id}``: hash with ``meta`` (the item's JSON description), ``d`` (its
  content digest) and one ``b:{field}`` entry per blob;
- ``B{T}:E:gen``: hash ``n`` (writes to the shard) and ``last`` (its latest score);
- ``B{T}:E:log``: stream of the shard's last writes (``n``, ``op``, ``ids`` as a JSON
  list), about ``CHANGE_LOG_MAX`` long, read by processes that keep the gallery resident;
- ``B{gallery}:deleting:E``: set while a deleted gallery's items are being removed; one left
  by a stopped process is finished by :meth:`RedisGalleryStore.finish_deletions`.

Retention: an item older than its gallery's retention (by insertion score) is left out of
every read at once; :meth:`purge_expired` removes such items through the same script as a
deletion, so that resident copies drop them too.

Durability: after each write script, on the same connection, ``WAIT min_replicas timeout``;
fewer acknowledgements raise :class:`service.domain.WriteNotReplicated` (the write itself is
whole on the master: one script; a retried upload with the same image ids is a no-op).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import redis
import redis.cluster
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.retry import Retry

from ..domain import WriteNotReplicated
from .base import (
    CHANGE_LOG_MAX,
    AddResult,
    Change,
    Chunk,
    GalleryConfig,
    GalleryItem,
    Generation,
    NewItem,
    StoreUnavailable,
    check_gallery_settings,
    checked_upload,
    resolved_gallery_settings,
    shard_of,
)

__all__ = ["RedisGalleryStore", "SLOTS"]

log = logging.getLogger(__name__)

SLOTS = 16384
_META = b"meta"
_DIGEST = b"d"
_DRAIN_CHUNK = 500
_PURGE_CHUNK = 500
_NO_CUTOFF = "-inf"
_CONF_FIELDS = (b"shards", b"retention", b"epoch", b"created", b"tags")
_WAIT_MARGIN_MS = 250  # a WAIT's reply must come well within the socket timeout


def _glob_escape(key: bytes) -> bytes:
    """``key`` with Redis glob characters escaped, to match it literally in SCAN."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", key)


# KEYS: ids, gen, log, then one item hash per item. ARGV: now (us), stream length, cutoff
# (score below which an item has expired), n, then per item: id, its place in the upload
# (so that an upload's items keep their order across shards), digest, meta, field count,
# field/value pairs. Checks every item first: an id already live with another digest is a
# conflict and nothing is written; with the same digest it is left as it is. Returns
# {'conflict', ids} or {'ok', existing ids, live size}.
_ADD_LUA = """
local ids, gen, log = KEYS[1], KEYS[2], KEYS[3]
local now, maxlen, cutoff, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local items, existing, conflicts, seen = {}, {}, {}, {}
local pos = 5
for k = 1, n do
  local id, digest, nf = ARGV[pos], ARGV[pos + 2], tonumber(ARGV[pos + 4])
  items[k] = {id, digest, ARGV[pos + 3], pos + 5, nf, tonumber(ARGV[pos + 1])}
  pos = pos + 5 + 2 * nf
  local score = redis.call('ZSCORE', ids, id)
  if score and tonumber(score) >= cutoff then
    if redis.call('HGET', KEYS[3 + k], 'd') == digest then
      table.insert(existing, id); seen[id] = true
    else
      table.insert(conflicts, id)
    end
  end
end
if #conflicts > 0 then return {'conflict', conflicts} end
local last = tonumber(redis.call('HGET', gen, 'last') or '0')
local added = {}
for k = 1, n do
  local it = items[k]
  if not seen[it[1]] then
    local score = math.max(now + it[6], last + 1)
    last = score
    local args = {'meta', it[3], 'd', it[2]}
    for f = 0, it[5] - 1 do
      table.insert(args, ARGV[it[4] + 2 * f]); table.insert(args, ARGV[it[4] + 2 * f + 1])
    end
    redis.call('DEL', KEYS[3 + k])
    redis.call('HSET', KEYS[3 + k], unpack(args))
    redis.call('ZADD', ids, string.format('%d', score), it[1])
    table.insert(added, it[1])
  end
end
-- Always a write, so that a WAIT after this script vouches for the items found stored too
-- (replicas apply writes in order: acknowledging this one acknowledges theirs).
redis.call('HSET', gen, 'ack', ARGV[1])
if #added > 0 then
  redis.call('HSET', gen, 'last', string.format('%d', last))
  local number = redis.call('HINCRBY', gen, 'n', 1)
  redis.call('XADD', log, 'MAXLEN', '~', maxlen, '*', 'n', number, 'op', 'add',
             'ids', cjson.encode(added))
end
return {'ok', existing, redis.call('ZCOUNT', ids, cutoff, '+inf')}
"""
# KEYS: ids, gen, log, then one item hash per id. ARGV: stream length, the score an item
# must be below to be removed ('+inf': any), then the ids. Removes the listed ones and logs
# one change; nothing is logged (nor any key created) when none was there.
_REMOVE_LUA = """
local below = ARGV[2]
local removed = {}
for k = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[k])
  if score and (below == '+inf' or tonumber(score) < tonumber(below)) then
    redis.call('ZREM', KEYS[1], ARGV[k])
    redis.call('DEL', KEYS[1 + k])
    table.insert(removed, ARGV[k])
  end
end
if #removed == 0 then return 0 end
local number = redis.call('HINCRBY', KEYS[2], 'n', 1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'n', number, 'op', 'remove',
           'ids', cjson.encode(removed))
return #removed
"""
# KEYS: gen, log. ARGV: the reader's number, the most changes worth replaying. Returns
# {n, newest-first entries} (no entries when they cannot or need not be replayed).
_CHANGES_LUA = """
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local behind = n - tonumber(ARGV[1])
if behind <= 0 or behind > tonumber(ARGV[2]) then return {n, {}} end
return {n, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', behind)}
"""
# KEYS: conf, the deletion marker (one slot); ARGV: the epoch being deleted. Renames the conf
# key to the marker unless another incarnation holds it.
_DETACH_LUA = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""
# KEYS: the registry; ARGV: SADD or SREM, the gallery name.
_REGISTER_LUA = "return redis.call(ARGV[1], KEYS[1], ARGV[2])"
# KEYS: conf. ARGV: shards, retention, epoch, created, tags. Creates it unless it exists;
# returns the stored fields either way.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'shards', ARGV[1], 'retention', ARGV[2], 'epoch', ARGV[3],
             'created', ARGV[4], 'tags', ARGV[5])
end
return redis.call('HMGET', KEYS[1], 'shards', 'retention', 'epoch', 'created', 'tags')
"""


def _live(score: float | None, cutoff: str) -> bool:
    """Whether an item of this insertion score is listed and not expired (``cutoff``: as
    :meth:`RedisGalleryStore._cutoff` gives it)."""
    return score is not None and (cutoff == _NO_CUTOFF or score >= float(cutoff))


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


def shard_tags(gallery: str, shards: int) -> list[str]:
    """Hash tags for ``shards`` shards of ``gallery``: shard ``s``'s slot lies in the ``s``-th
    of ``shards`` equal slot ranges, so that a cluster's masters (which usually own
    contiguous ranges) share a gallery's shards evenly."""
    tags = []
    for s in range(shards):
        lo, hi = s * SLOTS // shards, (s + 1) * SLOTS // shards
        k = 0
        while not lo <= key_slot(f"{gallery}/{s}.{k}".encode()) < hi:
            k += 1
        tags.append(f"{gallery}/{s}.{k}")
    return tags


@contextmanager
def _guard(what: str, url: str):
    try:
        yield
    except redis.RedisError as exc:
        raise StoreUnavailable(f"redis at {_describe(url)} failed to {what}: "
                               f"{type(exc).__name__}: {exc}",
                               public=f"redis failed to {what}; retry later") from exc


class _Shard:
    """The keys of one shard of one gallery incarnation."""

    def __init__(self, base: bytes, tag: str, epoch: str) -> None:
        self._p = base + b"{" + tag.encode() + b"}:" + epoch.encode() + b":"
        self.ids, self.gen, self.log = self._p + b"ids", self._p + b"gen", self._p + b"log"

    def item(self, image_id: str | bytes) -> bytes:
        if isinstance(image_id, str):
            image_id = image_id.encode()
        return self._p + b"i:" + image_id


class RedisGalleryStore:
    """Galleries in Redis under ``prefix + namespace + ":"``.

    ``url``: a ``redis://`` URL (a database number in its path picks the database; with
    ``cluster``, any one node of the cluster, from which the rest is discovered);
    ``client``: an existing client instead (the URL is then only used in messages).
    ``min_replicas``: replicas that must acknowledge each write within ``wait_timeout_ms``
    (``None``: 1 in cluster mode, else 0). ``default_shards``, ``default_retention_days``:
    the settings of a gallery created by an upload. ``clock``: the time retention is
    measured by.
    """

    kind = "redis"
    persistent = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", namespace: str = "default",
                 prefix: str = "dsmi:", socket_timeout: float = 1.0,
                 connect_timeout: float = 0.5, client: redis.Redis | None = None,
                 cluster: bool = False, min_replicas: int | None = None,
                 wait_timeout_ms: int = 500, default_shards: int = 1,
                 default_retention_days: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not namespace or not prefix:
            raise ValueError("prefix and namespace must not be empty")
        if any(ch in prefix + namespace for ch in "{}"):
            raise ValueError("prefix and namespace must not hold '{' or '}' (Redis Cluster "
                             "hash tags)")
        check_gallery_settings(default_shards, default_retention_days)
        self.url = url
        self.namespace = namespace
        self.prefix = prefix
        self.cluster = bool(cluster)
        self.min_replicas = (1 if self.cluster else 0) if min_replicas is None else min_replicas
        if self.min_replicas < 0 or wait_timeout_ms < 1:
            raise ValueError("min_replicas must be >= 0 and wait_timeout_ms >= 1")
        if self.min_replicas and wait_timeout_ms + _WAIT_MARGIN_MS > socket_timeout * 1000:
            # Else a WAIT running out races the socket's own timeout: a dropped connection
            # instead of a clear "not replicated".
            raise ValueError(f"wait_timeout_ms ({wait_timeout_ms}) must be at least "
                             f"{_WAIT_MARGIN_MS} ms below the socket timeout "
                             f"({socket_timeout * 1000:.0f} ms)")
        self.wait_timeout_ms = int(wait_timeout_ms)
        self.default_shards = default_shards
        self.default_retention_days = default_retention_days
        self.clock = clock
        self._base = f"{prefix}{namespace}:".encode()
        self._owns_client = client is None
        # One quick retry, for a dropped connection only: a dead server must turn into a 503
        # in about a second, and the pool reconnects by itself once the server is back. A
        # timeout is not retried: a hung server (stopped, not dead) would double the wait.
        common = dict(socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                      retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), retries=1,
                                  supported_errors=(redis.ConnectionError,)))
        if client is not None:
            self.client = client
        elif self.cluster:
            self.client = redis.cluster.RedisCluster.from_url(url, **common)
        else:
            self.client = redis.Redis.from_url(url, retry_on_timeout=False,
                                               health_check_interval=15, **common)

    # -- keys ---------------------------------------------------------------------------
    def _registry_key(self) -> bytes:
        return self._base + b"registry"

    def _conf_key(self, gallery: str) -> bytes:
        return self._base + b"{" + gallery.encode() + b"}:conf"

    def _deleting_key(self, gallery: str, epoch: str) -> bytes:
        return self._base + b"{" + gallery.encode() + b"}:deleting:" + epoch.encode()

    def _shards(self, config: GalleryConfig, tags: list[str]) -> list[_Shard]:
        return [_Shard(self._base, tag, config.epoch) for tag in tags]

    def _guard(self, what: str):
        return _guard(what, self.url)

    def _cutoff(self, config: GalleryConfig) -> str:
        """The lowest live score of ``config``'s gallery now (us), as Redis reads it."""
        if config.retention_s is None:
            return _NO_CUTOFF
        return str(math.floor((self.clock() - config.retention_s) * 1e6) + 1)

    # -- configs ----------------------------------------------------------------------------
    @staticmethod
    def _parse_config(fields: list) -> tuple[GalleryConfig, list[str]] | None:
        shards, retention, epoch, created, tags = fields
        if shards is None or epoch is None:
            return None
        days = float(retention) / 86400.0 if retention not in (None, b"") else None
        return (GalleryConfig(int(shards), days, epoch.decode(), float(created or 0)),
                json.loads(tags))

    def _read_config(self, gallery: str) -> tuple[GalleryConfig, list[str]] | None:
        return self._parse_config(self.client.hmget(self._conf_key(gallery), _CONF_FIELDS))

    def create_gallery(self, gallery: str, shards: int | None = None,
                       retention_days: float | None = None) -> tuple[GalleryConfig, bool]:
        with self._guard("create the gallery"):
            found = self._read_config(gallery)
            if found is not None:  # no write: nothing for the replicas to acknowledge
                return found[0], False
            config, _, created = self._create(gallery, shards, retention_days)
        return config, created

    def _create(self, gallery: str, shards: int | None, retention_days: float | None
                ) -> tuple[GalleryConfig, list[str], bool]:
        """Create ``gallery`` unless it exists -> (its config, its shards' tags, whether it
        was created now); the caller has seen no conf key."""
        shards, retention_days = resolved_gallery_settings(
            shards, retention_days, self.default_shards, self.default_retention_days)
        epoch = uuid.uuid4().hex
        retention = "" if retention_days is None else repr(float(retention_days) * 86400.0)
        fields = self._write(self._conf_key(gallery), _CREATE_LUA, [self._conf_key(gallery)],
                             [shards, retention, epoch, repr(self.clock()),
                              json.dumps(shard_tags(gallery, shards))])
        config, tags = self._parse_config(fields)
        created = config.epoch == epoch
        if created:
            self._write(self._registry_key(), _REGISTER_LUA, [self._registry_key()],
                        ["SADD", gallery])
        return config, tags, created

    def gallery_config(self, gallery: str) -> GalleryConfig | None:
        with self._guard("read the gallery"):
            found = self._read_config(gallery)
        return None if found is None else found[0]

    def _item_key(self, gallery: str, image_id: str) -> bytes | None:
        """Where an item's hash is (``None``: no such gallery); for repair tools and tests."""
        layout = self._layout(gallery)
        if layout is None:
            return None
        config, shards = layout
        return shards[shard_of(image_id, config.shards)].item(image_id)

    def _layout(self, gallery: str) -> tuple[GalleryConfig, list[_Shard]] | None:
        found = self._read_config(gallery)
        if found is None:
            return None
        config, tags = found
        return config, self._shards(config, tags)

    # -- writes -----------------------------------------------------------------------------
    def _node_client(self, key: bytes) -> redis.Redis:
        if not self.cluster:
            return self.client
        node = self.client.get_node_from_key(key)
        if node.redis_connection is None:
            self.client.nodes_manager.initialize()
            node = self.client.get_node_from_key(key)
        return node.redis_connection

    def _write(self, key: bytes, script: str, keys: Sequence[bytes], args: Sequence):
        """Run a write script on the node that owns ``key``'s slot, then WAIT on the same
        connection (WAIT counts the acknowledgements of this connection's writes). A moved
        slot or a dead node (a failover) refreshes the cluster's map and retries once: every
        write script is safe to run twice (an upload finds its items stored, a removal finds
        them gone)."""
        for attempt in (0, 1):
            try:
                pipe = self._node_client(key).pipeline(transaction=False)
                pipe.eval(script, len(keys), *keys, *args)
                if self.min_replicas:
                    pipe.execute_command("WAIT", self.min_replicas, self.wait_timeout_ms)
                replies = pipe.execute()
                break
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                topology = not isinstance(exc, redis.ResponseError) or str(exc).startswith(
                    ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"))
                if not self.cluster or attempt or not topology:
                    raise
                self.client.nodes_manager.initialize()
        if self.min_replicas and int(replies[1]) < self.min_replicas:
            raise WriteNotReplicated(
                f"the write was applied but only {replies[1]} of {self.min_replicas} "
                f"replica(s) acknowledged it within {self.wait_timeout_ms} ms; retry it",
                {"acknowledged": int(replies[1]), "required": self.min_replicas})
        return replies[0]

    def add_items(self, gallery: str, items: Sequence[NewItem]) -> AddResult:
        checked = checked_upload(items)  # before anything is written
        with self._guard("store the upload"):
            layout = self._layout(gallery)
            if layout is None:  # a new gallery, with the store's default settings
                config, tags, _ = self._create(gallery, None, None)
                layout = config, self._shards(config, tags)
            config, shards = layout
            groups: dict[int, list] = {}
            for entry in checked:
                groups.setdefault(shard_of(entry[0].item.image_id, config.shards),
                                  []).append(entry)
            cutoff = self._cutoff(config)
            # Conflicts are looked for on every shard before any is written.
            pipe = self.client.pipeline(transaction=False)
            order = []
            for s, group in groups.items():
                for new, _, _ in group:
                    pipe.zscore(shards[s].ids, new.item.image_id)
                    pipe.hmget(shards[s].item(new.item.image_id), [_DIGEST, _META])
                    order.append((s, new))
            replies = pipe.execute() if order else []
            conflicts, existing = [], {}
            for k, (s, new) in enumerate(order):
                score, (digest, meta) = replies[2 * k], replies[2 * k + 1]
                if not _live(score, cutoff):
                    continue
                if digest is not None and digest.decode() == new.digest:
                    existing[new.item.image_id] = _parse_meta(meta, shards[s].item(
                        new.item.image_id)) or new.item
                else:
                    conflicts.append(new.item.image_id)
            if conflicts:
                return AddResult(self._size_if_known(config, shards), [], [], conflicts)
            now_us = math.floor(self.clock() * 1e6)
            places = {new.item.image_id: k for k, (new, _, _) in enumerate(checked)}
            added: list[GalleryItem] = []
            for s, group in groups.items():
                shard = shards[s]
                group = [e for e in group if e[0].item.image_id not in existing]
                if not group and not self.min_replicas:
                    continue  # all stored already; with replicas, the script still vouches
                keys = [shard.ids, shard.gen, shard.log]
                args: list = [now_us, CHANGE_LOG_MAX,
                              cutoff if cutoff != _NO_CUTOFF else "-1e300", len(group)]
                fresh = []
                for new, _, blobs in group:
                    place = places[new.item.image_id]
                    item = dataclasses.replace(new.item, created_at=(now_us + place) / 1e6)
                    keys.append(shard.item(item.image_id))
                    args += [item.image_id, place, new.digest, item.to_json(), len(blobs)]
                    for f, v in blobs.items():
                        args += [_blob_key(f), v]
                    fresh.append(item)
                reply = self._write(shard.ids, _ADD_LUA, keys, args)
                if reply[0] == b"conflict":  # written by someone else since the check
                    conflicts += [i.decode() for i in reply[1]]
                    continue
                already = {i.decode() for i in reply[1]}  # an identical retry won the race
                for item in fresh:
                    if item.image_id in already:
                        existing[item.image_id] = self.get_item(gallery, item.image_id) or item
                    else:
                        added.append(item)
            size = self._size_if_known(config, shards)
        added.sort(key=lambda item: places[item.image_id])
        return AddResult(size, added, sorted(existing.values(),
                                             key=lambda item: places[item.image_id]), conflicts)

    def delete_item(self, gallery: str, image_id: str) -> bool:
        with self._guard("delete the item"):
            found = self._live_item(gallery, image_id, [_META])  # expired counts as gone
            if found is None or _parse_meta(found[1][0], found[0].item(image_id)) is None:
                return False
            shard = found[0]
            removed = self._write(shard.ids, _REMOVE_LUA,
                                  [shard.ids, shard.gen, shard.log, shard.item(image_id)],
                                  [CHANGE_LOG_MAX, "+inf", image_id])
        return bool(removed)

    def delete_gallery(self, gallery: str) -> int | None:
        with self._guard("delete the gallery"):
            layout = self._layout(gallery)
            if layout is None:
                return None
            config, shards = layout
            size = self._size(config, shards)
            # The gallery disappears at once: its conf key becomes the marker of the
            # incarnation whose items are being removed, so that a stopped process's work is
            # finished (finish_deletions).
            marker = self._deleting_key(gallery, config.epoch)
            conf = self._conf_key(gallery)
            if not self._write(conf, _DETACH_LUA, [conf, marker], [config.epoch]):
                return None  # deleted (or re-created) meanwhile
            self._write(self._registry_key(), _REGISTER_LUA, [self._registry_key()],
                        ["SREM", gallery])
            self._drain(marker, config, shards)
        return size

    def finish_deletions(self) -> int:
        finished = 0
        with self._guard("repair the gallery registry"):
            listed = {n.decode() for n in self.client.smembers(self._registry_key())}
            for name in set(self._scanned_gallery_names()) - listed:
                self.client.sadd(self._registry_key(), name)
        with self._guard("finish interrupted deletions"):
            pattern = _glob_escape(self._base) + b"{*}:deleting:*"
            for key in self._scan(pattern):
                found = self._parse_config(self.client.hmget(key, _CONF_FIELDS))
                if found is not None:
                    self._drain(key, found[0], self._shards(*found))
                else:
                    self.client.delete(key)
                finished += 1
        if finished:
            log.warning("finished %d gallery deletion(s) that a stopped process left half "
                        "done", finished)
        return finished

    def _drain(self, marker: bytes, config: GalleryConfig, shards: list[_Shard]) -> None:
        """Remove a deleted incarnation's keys, then its ``marker``."""
        for shard in shards:
            while True:
                ids = self.client.zrange(shard.ids, 0, _DRAIN_CHUNK - 1)
                if not ids:
                    break
                node = self._node_client(shard.ids)
                pipe = node.pipeline(transaction=False)
                pipe.unlink(*(shard.item(i) for i in ids))
                pipe.zrem(shard.ids, *ids)
                pipe.execute()
            self._node_client(shard.ids).unlink(shard.ids, shard.gen, shard.log)
        self.client.delete(marker)

    def purge_expired(self) -> int:
        removed = 0
        with self._guard("purge expired items"):
            for gallery in self._gallery_names():
                layout = self._layout(gallery)
                if layout is None or layout[0].retention_s is None:
                    continue
                config, shards = layout
                cutoff = self._cutoff(config)
                for shard in shards:
                    while True:
                        ids = self.client.zrange(shard.ids, "-inf", f"({cutoff}", byscore=True,
                                                 offset=0, num=_PURGE_CHUNK)
                        if not ids:
                            break
                        removed += int(self._write(
                            shard.ids, _REMOVE_LUA,
                            [shard.ids, shard.gen, shard.log, *(shard.item(i) for i in ids)],
                            [CHANGE_LOG_MAX, cutoff, *ids]))
        return removed

    # -- reads ------------------------------------------------------------------------------
    def _evals(self, script: str, calls: list[tuple[list[bytes], list]]) -> list:
        """Run a read-only script once per (keys, args): in one pipeline on one server; on a
        cluster (whose pipelines take no scripts) one call each, routed by its keys."""
        if self.cluster:
            return [self.client.eval(script, len(keys), *keys, *args) for keys, args in calls]
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.eval(script, len(keys), *keys, *args)
        return pipe.execute()

    def ping(self) -> None:
        with self._guard("answer PING"):
            self.client.ping()

    def _scan(self, pattern: bytes) -> Iterator[bytes]:
        yield from self.client.scan_iter(match=pattern, count=1000)

    def _scanned_gallery_names(self) -> list[str]:
        """The galleries by their conf keys (a scan of the whole namespace: start-up only)."""
        start = len(self._base) + 1
        names = set()
        for key in self._scan(_glob_escape(self._base) + b"{*}:conf"):
            names.add(key[start:-len(b"}:conf")].decode())
        return sorted(names)

    def _gallery_names(self) -> list[str]:
        return sorted(n.decode() for n in self.client.smembers(self._registry_key()))

    def _size(self, config: GalleryConfig, shards: list[_Shard]) -> int:
        cutoff = self._cutoff(config)
        pipe = self.client.pipeline(transaction=False)
        for shard in shards:
            pipe.zcount(shard.ids, cutoff, "+inf")
        return sum(int(n) for n in pipe.execute())

    def _size_if_known(self, config: GalleryConfig, shards: list[_Shard]) -> int | None:
        """The size after an upload, or ``None`` when a shard the upload did not touch
        cannot be counted now (its master failing over): the upload itself has succeeded."""
        try:
            return self._size(config, shards)
        except redis.RedisError as exc:
            log.info("gallery size unknown after an upload: %s", exc)
            return None

    def gallery_size(self, gallery: str) -> int | None:
        with self._guard("read the gallery size"):
            layout = self._layout(gallery)
            return None if layout is None else self._size(*layout)

    def list_galleries(self) -> dict[str, int]:
        with self._guard("list the galleries"):
            names = self._gallery_names()
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hmget(self._conf_key(name), _CONF_FIELDS)
            layouts = []
            for name, fields in zip(names, pipe.execute() if names else [], strict=True):
                found = self._parse_config(fields)
                if found is not None:  # else deleted since it was listed
                    layouts.append((name, found[0], self._shards(*found)))
            pipe = self.client.pipeline(transaction=False)
            for _, config, shards in layouts:
                cutoff = self._cutoff(config)
                for shard in shards:
                    pipe.zcount(shard.ids, cutoff, "+inf")
            counts = iter(pipe.execute() if layouts else [])
            return {name: sum(int(next(counts)) for _ in shards)
                    for name, _, shards in layouts}

    def list_items(self, gallery: str, offset: int, limit: int
                   ) -> tuple[int, list[GalleryItem]] | None:
        with self._guard("list the gallery"):
            layout = self._layout(gallery)
            if layout is None:
                return None
            config, shards = layout
            cutoff = self._cutoff(config)
            pipe = self.client.pipeline(transaction=False)
            for shard in shards:
                pipe.zcount(shard.ids, cutoff, "+inf")
                # Insertion order across shards: each shard's first offset + limit, merged.
                pipe.zrange(shard.ids, cutoff, "+inf", byscore=True, offset=0,
                            num=offset + limit, withscores=True)
            replies = pipe.execute()
            total = sum(int(n) for n in replies[0::2])
            rows = sorted((score, s, image_id) for s, page in enumerate(replies[1::2])
                          for image_id, score in page)[offset:offset + limit]
            pipe = self.client.pipeline(transaction=False)
            for _, s, image_id in rows:
                pipe.hget(shards[s].item(image_id), _META)
            metas = pipe.execute() if rows else []
        parsed = (_parse_meta(m, shards[s].item(i)) for m, (_, s, i) in zip(metas, rows,
                                                                              strict=True))
        return total, [item for item in parsed if item is not None]

    def _live_item(self, gallery: str, image_id: str, fields: list[bytes]):
        """(the item's shard, the HMGET of ``fields``) if it is live, else ``None``."""
        layout = self._layout(gallery)
        if layout is None:
            return None
        config, shards = layout
        shard = shards[shard_of(image_id, config.shards)]
        pipe = self.client.pipeline(transaction=False)
        pipe.zscore(shard.ids, image_id)
        pipe.hmget(shard.item(image_id), fields)
        score, values = pipe.execute()
        cutoff = self._cutoff(config)
        if not _live(score, cutoff):
            return None
        return shard, values

    def get_item(self, gallery: str, image_id: str) -> GalleryItem | None:
        with self._guard("read the item"):
            found = self._live_item(gallery, image_id, [_META])
        if found is None:
            return None
        shard, (meta,) = found
        return _parse_meta(meta, shard.item(image_id))

    def get_blobs(self, gallery: str, image_id: str, fields: Sequence[str]
                  ) -> dict[str, bytes] | None:
        with self._guard("read the item"):
            found = self._live_item(gallery, image_id, [_blob_key(f) for f in fields])
        if found is None:
            return None
        return {f: v for f, v in zip(fields, found[1], strict=True) if v is not None}

    def iter_chunks(self, gallery: str, fields: Sequence[str], chunk_size: int
                    ) -> Iterator[Chunk]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        with self._guard("read the gallery"):
            layout = self._layout(gallery)
        if layout is None:
            return
        config, shards = layout
        wanted = [_META] + [_blob_key(f) for f in fields]
        for shard in shards:
            cursor: str = self._cutoff(config)
            while True:
                with self._guard("read the gallery"):
                    rows = self.client.zrange(shard.ids, cursor, "+inf", byscore=True,
                                              offset=0, num=chunk_size, withscores=True)
                    if not rows:
                        break
                    pipe = self.client.pipeline(transaction=False)
                    for image_id, _ in rows:
                        pipe.hmget(shard.item(image_id), wanted)
                    values = pipe.execute()
                chunk = self._chunk(shard, [image_id for image_id, _ in rows], values, fields)
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
            layout = self._layout(gallery)
            if layout is None:
                return []
            config, shards = layout
            cutoff = self._cutoff(config)
            where = [shards[shard_of(i, config.shards)] for i in image_ids]
            pipe = self.client.pipeline(transaction=False)
            for image_id, shard in zip(image_ids, where, strict=True):
                pipe.zscore(shard.ids, image_id)
                pipe.hmget(shard.item(image_id), wanted)
            replies = pipe.execute()
        chunk: Chunk = []
        for k, (image_id, shard) in enumerate(zip(image_ids, where, strict=True)):
            score, row = replies[2 * k], replies[2 * k + 1]
            # An item hash can outlive its listing while a deleted gallery is being drained.
            if not _live(score, cutoff):
                continue
            chunk += self._chunk(shard, [image_id], [row], fields)
        return chunk

    @staticmethod
    def _chunk(shard: _Shard, image_ids: Sequence[str | bytes], rows: Sequence[list],
               fields: Sequence[str]) -> Chunk:
        """HMGET rows (meta, then the fields) -> a chunk; an item whose meta is gone (deleted
        since its id was read) or damaged (logged) is left out."""
        chunk: Chunk = []
        for image_id, row in zip(image_ids, rows, strict=True):
            item = _parse_meta(row[0], shard.item(image_id))
            if item is not None:
                chunk.append((item, {f: v for f, v in zip(fields, row[1:], strict=True)
                                     if v is not None}))
        return chunk

    def generation(self, gallery: str) -> Generation:
        with self._guard("read the gallery generation"):
            layout = self._layout(gallery)
            if layout is None:
                return Generation("")
            config, shards = layout
            pipe = self.client.pipeline(transaction=False)
            for shard in shards:
                pipe.hget(shard.gen, b"n")
            numbers = tuple(int(n or 0) for n in pipe.execute())
        return Generation(config.epoch, numbers, config.retention_s)

    def changes_since(self, gallery: str, since: Generation
                      ) -> tuple[Generation, list[Change] | None]:
        with self._guard("read the gallery changes"):
            layout = self._layout(gallery)
            if layout is None:
                return Generation(""), (None if since.epoch else [])
            config, shards = layout
            same = config.epoch == since.epoch and len(since.numbers) == len(shards)
            replies = self._evals(_CHANGES_LUA, [
                ([shard.gen, shard.log],
                 [since.numbers[s] if same else 0, CHANGE_LOG_MAX if same else 0])
                for s, shard in enumerate(shards)])
        now = Generation(config.epoch, tuple(int(n) for n, _ in replies), config.retention_s)
        if now == since:
            return now, []
        if not same:
            return now, None
        changes: list[Change] = []
        for s, (number, entries) in enumerate(replies):
            shard_changes = []
            for _, fields in reversed(entries):
                values = dict(zip(fields[::2], fields[1::2], strict=True))
                try:
                    shard_changes.append(Change(int(values[b"n"]), values[b"op"].decode(),
                                                tuple(json.loads(values[b"ids"])), s))
                except (KeyError, ValueError, TypeError):
                    log.warning("gallery %s: unreadable change record %r", gallery, values)
                    return now, None
            # The stream is trimmed lazily and may have lost the oldest entries asked for.
            if [c.number for c in shard_changes] != list(range(since.numbers[s] + 1,
                                                              int(number) + 1)):
                return now, None
            changes += shard_changes
        return now, changes

    def clear(self) -> None:
        pattern = _glob_escape(self._base) + b"*"
        with self._guard("clear the namespace"):
            batch: list[bytes] = []
            for key in self._scan(pattern):
                batch.append(key)
                if len(batch) >= 1000:
                    self._unlink_each(batch)
            self._unlink_each(batch)

    def _unlink_each(self, keys: list[bytes]) -> None:
        """UNLINK ``keys`` (of any slots) in one pipeline, and empty the list."""
        if keys:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.unlink(key)
            pipe.execute()
            keys.clear()

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

