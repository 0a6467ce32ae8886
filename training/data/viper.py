"""VIPeR in its official layout: ``cam_a/NNN_ANGLE.bmp`` and ``cam_b/NNN_ANGLE.bmp``.

Person ``NNN`` was seen once by each camera; camera A is camid 1, camera B camid 2. The
paper's protocol splits the 632 identities into random 316/316 halves
(:func:`training.data.splits.viper_split`).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .layout import DatasetLayoutError, find_layout_root
from .records import ImageRecord

__all__ = ["read_viper", "VIPER_CAMERAS"]

VIPER_CAMERAS = {"cam_a": 1, "cam_b": 2}
_NAME = re.compile(r"(\d+)_(\d+)\.bmp", re.IGNORECASE)


def read_viper(root: str | Path, split: str = "all") -> list[ImageRecord]:
    """Records of every VIPeR image under ``root`` (or ``root/VIPeR``), sorted by pid, camera.

    Raises :class:`DatasetLayoutError` when ``cam_a/`` or ``cam_b/`` is missing or empty, and
    ``ValueError`` for a file name that is not ``NNN_ANGLE.bmp`` or a person not seen exactly
    once by each camera (a damaged copy).
    """
    base = find_layout_root(root, list(VIPER_CAMERAS), "VIPeR", wrappers=("VIPeR", "viper"),
                            hint="expected cam_a/ and cam_b/ holding NNN_ANGLE.bmp files")
    records = []
    for folder, camid in VIPER_CAMERAS.items():
        files = sorted(p for p in (base / folder).iterdir() if p.suffix.lower() == ".bmp")
        if not files:
            raise DatasetLayoutError(f"VIPeR: no .bmp images in {base / folder}")
        for path in files:
            match = _NAME.fullmatch(path.name)
            if not match:
                raise ValueError(f"VIPeR: unexpected file name {path} (expected NNN_ANGLE.bmp)")
            records.append(ImageRecord(path.resolve(), int(match.group(1)), camid, split))
    counts = Counter((r.pid, r.camid) for r in records)
    pids = {r.pid for r in records}
    broken = sorted(pid for pid in pids
                    if any(counts[(pid, cam)] != 1 for cam in VIPER_CAMERAS.values()))
    if broken:
        raise ValueError(f"VIPeR: {len(broken)} person(s) do not have exactly one image per "
                         f"camera in {base}, e.g. pid(s) {broken[:5]}")
    return sorted(records, key=lambda r: (r.pid, r.camid))
