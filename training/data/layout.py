"""Finding an official dataset layout on disk, with errors that say what is missing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["DatasetLayoutError", "find_layout_root"]


class DatasetLayoutError(FileNotFoundError):
    """A dataset's official layout is not where it was looked for; the message names what is
    missing and where."""


def find_layout_root(root: str | Path, required: Sequence[str], dataset: str,
                     wrappers: Sequence[str] = (), hint: str = "") -> Path:
    """The folder holding every entry of ``required``: ``root`` itself or ``root/<wrapper>``
    for one of ``wrappers`` (the folder names the official archives unpack to)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{dataset}: {root} is not a directory")
    candidates = [root] + [root / w for w in wrappers if (root / w).is_dir()]
    for candidate in candidates:
        if all((candidate / name).exists() for name in required):
            return candidate
    best = max(candidates, key=lambda c: sum((c / n).exists() for n in required))
    missing = [name for name in required if not (best / name).exists()]
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetLayoutError(
        f"{dataset} layout not found: missing {', '.join(missing)} in {best} "
        f"(looked in {looked}){'; ' + hint if hint else ''}")
