"""Market-1501 in its official layout.

``bounding_box_train/`` (split ``train``), ``query/`` (``query``), ``bounding_box_test/``
(``gallery``); files ``PPPP_cCsS_FFFFFF_BB.jpg``: person PPPP, camera C (1-6), sequence S,
frame FFFFFF, box BB. Person -1 marks junk boxes, dropped here as the official evaluation
ignores them; person 0000 marks distractors (people with no match), kept as pid 0 so that the
gallery keeps its official size and difficulty.
"""

from __future__ import annotations

import re
from pathlib import Path

from .layout import DatasetLayoutError, find_layout_root
from .records import ImageRecord

__all__ = ["read_market1501", "MARKET1501_FOLDERS", "parse_market1501_name"]

MARKET1501_FOLDERS = {"train": "bounding_box_train", "query": "query",
                      "gallery": "bounding_box_test"}
_NAME = re.compile(r"(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.jpg", re.IGNORECASE)


def parse_market1501_name(name: str) -> tuple[int, int]:
    """``"0002_c1s1_000451_03.jpg"`` -> ``(pid 2, camid 1)``; ``ValueError`` otherwise."""
    match = _NAME.fullmatch(name)
    if not match:
        raise ValueError(f"Market-1501: unexpected file name {name!r} "
                         "(expected PPPP_cCsS_FFFFFF_BB.jpg)")
    return int(match.group(1)), int(match.group(2))


def read_market1501(root: str | Path, splits: tuple[str, ...] = ("train", "query", "gallery")
                    ) -> list[ImageRecord]:
    """Records of the wanted ``splits`` under ``root`` (or ``root/Market-1501-v15.09.15``).

    Junk boxes (pid -1) are dropped; distractors stay as pid 0. Raises
    :class:`DatasetLayoutError` naming the missing folder(s).
    """
    unknown = set(splits) - set(MARKET1501_FOLDERS)
    if unknown:
        raise ValueError(f"unknown Market-1501 split(s) {sorted(unknown)}; "
                         f"known: {list(MARKET1501_FOLDERS)}")
    folders = [MARKET1501_FOLDERS[s] for s in splits]
    base = find_layout_root(root, folders, "Market-1501",
                            wrappers=("Market-1501-v15.09.15", "Market-1501", "market1501"),
                            hint="expected bounding_box_train/, bounding_box_test/, query/")
    records = []
    for split in splits:
        folder = base / MARKET1501_FOLDERS[split]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg")
        if not files:
            raise DatasetLayoutError(f"Market-1501: no .jpg images in {folder}")
        for path in files:
            pid, camid = parse_market1501_name(path.name)
            if pid == -1:
                continue
            records.append(ImageRecord(path.resolve(), pid, camid, split))
    return records
