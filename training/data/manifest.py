"""Manifest CSVs: ``path,pid,camid,split``, paths relative to the CSV's folder."""

from __future__ import annotations

import csv
from pathlib import Path

from .records import ImageRecord

__all__ = ["read_manifest", "ManifestError"]

REQUIRED = ("path", "pid", "camid", "split")


class ManifestError(ValueError):
    """The manifest is malformed; the message names the file and line."""


def read_manifest(csv_path: str | Path, check_files: bool = True) -> list[ImageRecord]:
    """Read a manifest into records (absolute paths). ``check_files`` verifies each exists."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"manifest not found: {csv_path}")
    root = csv_path.resolve().parent
    records = []
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{csv_path}: missing column(s) {missing}; need {REQUIRED}")
        for line, row in enumerate(reader, start=2):
            try:
                pid, camid = int(row["pid"]), int(row["camid"])
            except (TypeError, ValueError) as exc:
                raise ManifestError(f"{csv_path}:{line}: pid and camid must be integers") from exc
            path = root / row["path"]
            if check_files and not path.is_file():
                raise ManifestError(f"{csv_path}:{line}: image not found: {path}")
            records.append(ImageRecord(path, pid, camid, row["split"] or "all"))
    if not records:
        raise ManifestError(f"{csv_path}: no rows")
    return records
