"""API keys with scopes: which galleries a key may touch and what it may do there.

A key has rights and a gallery scope:

- ``read``: list galleries and images, get an image, query a gallery;
- ``write``: upload images, delete images and galleries;
- ``admin``: every right on every gallery, and ``/metrics``.

The gallery scope is a list of names, or prefixes ending in ``*`` (``site1-*``); ``*`` alone
is every gallery. Keys come from ``DSMI_API_KEYS`` (comma-separated entries) and/or the YAML
file named by ``DSMI_API_KEYS_FILE``. An entry is ``KEY`` (an admin key, as keys were before
scopes existed) or ``KEY:RIGHTS:GALLERIES`` with ``+`` between rights and between galleries,
e.g. ``s3cret:read+write:entrance+lobby-*``. The file holds a list under ``keys``::

    keys:
      - key: s3cret
        name: site 1 cameras      # shown in the log, never the key itself
        rights: [read, write]
        galleries: [entrance, "lobby-*"]
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RIGHTS", "ApiKey", "KeyRing", "parse_key_entry", "load_keys_file",
           "gallery_path", "required_access", "key_ring_from"]

RIGHTS = ("read", "write", "admin")
_MIN_KEY_LENGTH = 8
_GALLERY_SCOPE = re.compile(r"\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63}\*?")


@dataclass(frozen=True)
class ApiKey:
    key: str
    name: str
    rights: frozenset[str]
    galleries: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.key) < _MIN_KEY_LENGTH or not self.key.isprintable() or ":" in self.key \
                or "," in self.key or " " in self.key:
            raise ValueError(f"API key {self.name!r}: a key is at least {_MIN_KEY_LENGTH} "
                             "printable characters without spaces, ':' or ','")
        unknown = set(self.rights) - set(RIGHTS)
        if unknown or not self.rights:
            raise ValueError(f"API key {self.name!r}: rights must be some of "
                             f"{', '.join(RIGHTS)}, not {sorted(self.rights) or 'none'}")
        bad = [g for g in self.galleries if not _GALLERY_SCOPE.fullmatch(g)]
        if bad or not self.galleries:
            raise ValueError(f"API key {self.name!r}: galleries must be names, 'prefix*' or "
                             f"'*', not {bad or 'none'}")

    @property
    def is_admin(self) -> bool:
        return "admin" in self.rights

    def sees(self, gallery: str) -> bool:
        """Whether ``gallery`` is in this key's scope."""
        if self.is_admin:
            return True
        for scope in self.galleries:
            if scope == "*" or scope == gallery or (
                    scope.endswith("*") and gallery.startswith(scope[:-1])):
                return True
        return False

    def allows(self, right: str, gallery: str | None = None) -> bool:
        """Whether this key may use ``right`` (on ``gallery`` when one is named)."""
        if self.is_admin:
            return True
        if right not in self.rights:
            return False
        return gallery is None or self.sees(gallery)


def parse_key_entry(entry: str, index: int = 0) -> ApiKey:
    """One ``DSMI_API_KEYS`` entry: ``KEY`` (admin) or ``KEY:RIGHTS:GALLERIES``."""
    parts = entry.strip().split(":")
    name = f"DSMI_API_KEYS[{index}]"
    if len(parts) == 1:
        return ApiKey(parts[0], name, frozenset({"admin"}), ("*",))
    if len(parts) != 3:
        raise ValueError(f"{name}: expected KEY or KEY:RIGHTS:GALLERIES "
                         "(e.g. s3cret:read+write:entrance+lobby-*)")
    key, rights, galleries = parts
    return ApiKey(key, name, frozenset(r for r in rights.split("+") if r),
                  tuple(g for g in galleries.split("+") if g))


def load_keys_file(path: str | Path) -> list[ApiKey]:
    """The keys of a YAML keys file (see the module docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"DSMI_API_KEYS_FILE: no such file: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list under 'keys'")
    keys = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise ValueError(f"{path}: keys[{k}] needs a 'key' string")
        unknown = set(entry) - {"key", "name", "rights", "galleries"}
        if unknown:
            raise ValueError(f"{path}: keys[{k}] has unknown fields {sorted(unknown)}")
        rights = entry.get("rights", ["read"])
        galleries = entry.get("galleries", ["*"])
        if not isinstance(rights, list) or not isinstance(galleries, list):
            raise ValueError(f"{path}: keys[{k}]: rights and galleries are lists")
        keys.append(ApiKey(entry["key"], str(entry.get("name", f"{path.name}[{k}]")),
                           frozenset(map(str, rights)), tuple(map(str, galleries))))
    return keys


class KeyRing:
    """The configured keys; ``find`` compares a given key with every one in constant time."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys: tuple[ApiKey, ...] = tuple(keys)
        seen = set()
        for key in self.keys:
            if key.key in seen:
                raise ValueError(f"API key {key.name!r} is configured twice")
            seen.add(key.key)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, given: str) -> ApiKey | None:
        # Every key is compared: neither the time nor the position of a match says
        # anything about the keys.
        given_bytes = given.encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(given_bytes, key.key.encode()):
                found = key
        return found


_GALLERY_PATH = re.compile(r"^/v1/galleries/([^/]+)(/.*)?$")


def gallery_path(path: str) -> tuple[str, str] | None:
    """``/v1/galleries/{gallery}{rest}`` -> ``(gallery, rest)`` (``rest`` may be empty), or
    ``None`` for any other path."""
    match = _GALLERY_PATH.match(path)
    return (match.group(1), match.group(2) or "") if match else None


def required_access(method: str, path: str) -> tuple[str, str | None] | None:
    """The right a request needs and the gallery it touches, from its method and path;
    ``None`` for paths that need no key (health, docs)."""
    if path == "/metrics":
        return "admin", None
    if path != "/v1" and not path.startswith("/v1/"):
        return None
    parts = gallery_path(path)
    gallery = parts[0] if parts else None
    write = method in ("POST", "PUT", "PATCH", "DELETE") and not (
        method == "POST" and parts is not None and parts[1] == "/query")
    return ("write" if write else "read"), gallery


def key_ring_from(entries: Sequence[str], keys_file: str | Path | None) -> KeyRing:
    keys = [parse_key_entry(entry, k) for k, entry in enumerate(entries)]
    if keys_file is not None:
        keys += load_keys_file(keys_file)
    return KeyRing(keys)
