"""Seeded, identity-disjoint splits, and the query/gallery protocol of two-camera datasets.

Every split is by identity (no person in two parts) and reproducible: the same records and seed
give the same split on any machine (``numpy.random.default_rng`` over the sorted pids). The
returned records carry the part's name in ``split``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from .records import ImageRecord, identities

__all__ = ["split_by_identity", "viper_split", "cuhk03_split", "cuhk03_official_split",
           "carve_validation", "query_gallery"]


def _renamed(records: Iterable[ImageRecord], split: str) -> list[ImageRecord]:
    return [dataclasses.replace(r, split=split) for r in records]


def split_by_identity(records: Sequence[ImageRecord], sizes: dict[str, int | None],
                      seed: int) -> dict[str, list[ImageRecord]]:
    """Draw disjoint sets of identities of the given ``sizes`` (in order; at most one size
    ``None``: every identity left over) -> ``{name: records}`` in the input order.

    Raises ``ValueError`` when there are not enough identities.
    """
    pids = np.asarray(identities(records))
    if sum(v is None for v in sizes.values()) > 1:
        raise ValueError("at most one part may take the remaining identities (size None)")
    fixed = sum(v for v in sizes.values() if v is not None)
    if any(v is not None and v < 0 for v in sizes.values()):
        raise ValueError(f"part sizes must not be negative: {sizes}")
    if fixed > len(pids):
        raise ValueError(f"cannot split {len(pids)} identities into {sizes}: need {fixed}")
    perm = np.random.default_rng(seed).permutation(len(pids))
    owner: dict[int, str] = {}
    start = 0
    for name, size in sizes.items():
        count = len(pids) - fixed if size is None else size
        owner.update((int(pid), name) for pid in pids[perm[start:start + count]])
        start += count
    parts: dict[str, list[ImageRecord]] = {name: [] for name in sizes}
    for r in records:
        name = owner.get(r.pid)
        if name is not None:
            parts[name].append(dataclasses.replace(r, split=name))
    return parts


def viper_split(records: Sequence[ImageRecord], seed: int
                ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The paper's VIPeR protocol: random halves of the identities (316/316 of 632)
    -> ``(train, test)``; with an odd count the test half gets the extra identity."""
    num_ids = len(identities(records))
    if num_ids < 2:
        raise ValueError(f"VIPeR split needs at least 2 identities, got {num_ids}")
    parts = split_by_identity(records, {"train": num_ids // 2, "test": None}, seed)
    return parts["train"], parts["test"]


def cuhk03_split(records: Sequence[ImageRecord], seed: int, num_train: int | None = 1160,
                 num_val: int = 100, num_test: int = 100
                 ) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """The paper's CUHK03 protocol: random 1160/100/100 train/val/test identities
    -> ``(train, val, test)``.

    The release has 1467 persons; the paper counts 1360, so with the defaults 107 identities
    are in no part. ``num_train=None`` trains on every identity not drawn for val and test.
    """
    parts = split_by_identity(records, {"test": num_test, "val": num_val, "train": num_train},
                              seed)
    return parts["train"], parts["val"], parts["test"]


def cuhk03_official_split(records: Sequence[ImageRecord], testsets: Sequence[Sequence[int]],
                          k: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Official CUHK03 test set ``k`` (1-20) -> ``(train, test)``: the test set's persons
    (from :func:`training.data.cuhk03.cuhk03_testsets`) and everybody else."""
    if not 1 <= k <= len(testsets):
        raise ValueError(f"test set k must be in 1..{len(testsets)}, got {k}")
    test_pids = {int(p) for p in testsets[k - 1]}
    present = {r.pid for r in records}
    absent = test_pids - present
    if absent:
        raise ValueError(f"{len(absent)} person(s) of test set {k} have no records, e.g. "
                         f"{sorted(absent)[:5]}: were the records read from the same .mat?")
    train = _renamed((r for r in records if r.pid not in test_pids), "train")
    test = _renamed((r for r in records if r.pid in test_pids), "test")
    return train, test


def carve_validation(records: Sequence[ImageRecord], num_ids: int | None = None,
                     fraction: float | None = None, seed: int = 0
                     ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out identities for validation -> ``(train, val)``, identity-disjoint.

    Give ``num_ids`` (how many identities) or ``fraction`` (of the identities, rounded, at
    least one); both sides must keep at least one identity.
    """
    if (num_ids is None) == (fraction is None):
        raise ValueError("give exactly one of num_ids and fraction")
    total = len(identities(records))
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        num_ids = max(1, round(total * fraction))
    if not 1 <= num_ids < total:
        raise ValueError(f"cannot hold out {num_ids} of {total} identities: "
                         "both sides need at least one")
    parts = split_by_identity(records, {"val": num_ids, "train": None}, seed)
    return parts["train"], parts["val"]


def query_gallery(records: Sequence[ImageRecord], query_camid: int = 1,
                  gallery_camid: int = 2) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Two-camera evaluation protocol: camera-1 images are the queries, camera-2 images the
    gallery (VIPeR; the manifest's CUHK03 ``val``). Split names are kept.

    Raises ``ValueError`` when either side is empty or other cameras are present.
    """
    cams = sorted({r.camid for r in records})
    other = [c for c in cams if c not in (query_camid, gallery_camid)]
    if other:
        raise ValueError(f"query_gallery is for two-camera data ({query_camid}, "
                         f"{gallery_camid}); the records also have camera(s) {other}")
    queries = [r for r in records if r.camid == query_camid]
    gallery = [r for r in records if r.camid == gallery_camid]
    if not queries or not gallery:
        raise ValueError(f"no {'query' if not queries else 'gallery'} images: need images of "
                         f"camera {query_camid} (queries) and camera {gallery_camid} (gallery)")
    return queries, gallery
