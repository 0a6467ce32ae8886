"""The one in-memory form of a re-id dataset: a list of image records."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ImageRecord", "by_split", "identities", "relabel"]


@dataclass(frozen=True)
class ImageRecord:
    """One image: absolute ``path``, person id ``pid``, camera id ``camid``, ``split`` name.

    ``pid`` 0 or more; readers drop junk images (Market-1501's pid -1) and keep distractors
    (Market-1501's 0000) under pid 0 in the gallery split.
    """

    path: Path
    pid: int
    camid: int
    split: str = "all"


def by_split(records: Iterable[ImageRecord], split: str) -> list[ImageRecord]:
    return [r for r in records if r.split == split]


def identities(records: Iterable[ImageRecord]) -> list[int]:
    """Sorted distinct person ids."""
    return sorted({r.pid for r in records})


def relabel(records: Iterable[ImageRecord]) -> tuple[list[ImageRecord], dict[int, int]]:
    """Records with pids renumbered 0..n-1 (for a softmax over training identities)."""
    records = list(records)
    mapping = {pid: k for k, pid in enumerate(identities(records))}
    return [ImageRecord(r.path, mapping[r.pid], r.camid, r.split) for r in records], mapping
