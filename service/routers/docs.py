"""``/docs`` (Swagger UI) and ``/redoc`` served with their JavaScript and CSS from the installed
package ``fastapi-offline`` (MIT): no CDN, so they render on a site without internet access."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["router", "ASSETS_PATH", "assets_app", "SAME_ORIGIN_ONLY"]

ASSETS_PATH = "/docs-assets"
# The pages may load nothing from elsewhere: ReDoc, for one, still asks a CDN for a logo.
# Their inline start-up scripts and styles are allowed; workers and images may be blobs.
SAME_ORIGIN_ONLY = {"Content-Security-Policy": (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
    "'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:; "
    "connect-src 'self'; frame-ancestors 'none'")}


def _assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def assets_app() -> StaticFiles:
    """The static files of the two documentation pages, to mount at :data:`ASSETS_PATH`."""
    return StaticFiles(directory=_assets_dir())


router = APIRouter(include_in_schema=False)


def _urls(request: Request) -> tuple[str, str]:
    """The OpenAPI document's URL and the assets' base, behind any proxy prefix."""
    root = request.scope.get("root_path", "")
    return f"{root}{request.app.openapi_url}", f"{root}{ASSETS_PATH}"


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    openapi, assets = _urls(request)
    page = get_swagger_ui_html(
        openapi_url=openapi, title=f"{request.app.title} - docs",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css", swagger_favicon_url=f"{assets}/favicon.png")
    page.headers.update(SAME_ORIGIN_ONLY)
    return page


@router.get("/redoc", response_class=HTMLResponse)
def redoc(request: Request) -> HTMLResponse:
    openapi, assets = _urls(request)
    page = get_redoc_html(
        openapi_url=openapi, title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
        with_google_fonts=False)
    page.headers.update(SAME_ORIGIN_ONLY)
    return page
