"""The operator's web console: one page and its script and style, shipped in the package
(``service/console/``), no CDN and no build step. It uses the public ``/v1`` API like any
other client (so API keys apply to what it does, not to loading the page)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .docs import SAME_ORIGIN_ONLY

__all__ = ["router", "CONSOLE_DIR", "ASSETS_PATH", "assets_app"]

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
ASSETS_PATH = "/console"

router = APIRouter(include_in_schema=False)


def assets_app() -> StaticFiles:
    """The console's script and style, to mount at :data:`ASSETS_PATH`."""
    return StaticFiles(directory=CONSOLE_DIR)


@router.get("/")
def console() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html",
                        headers=SAME_ORIGIN_ONLY)
