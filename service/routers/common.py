"""Path parameters and documented error responses shared by the routers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Form, Path

from ..schemas import GALLERY_PATTERN, IMAGE_ID_PATTERN, ErrorResponse

# Form models with files are multipart bodies (FastAPI's default for Form() is urlencoded,
# which would misdocument the uploads in OpenAPI).
MULTIPART = Form(media_type="multipart/form-data")

GalleryName = Annotated[str, Path(pattern=GALLERY_PATTERN, max_length=64,
                                  description="Gallery name: letters, digits, '.', '_', '-'",
                                  examples=["entrance"])]
ImageId = Annotated[str, Path(pattern=IMAGE_ID_PATTERN, min_length=1, max_length=64,
                              description="Image id given at upload")]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses (all share one body)."""
    text = {400: "Unreadable input", 401: "Missing or invalid API key",
            403: "The API key lacks the right or the gallery", 404: "Not found",
            409: "Conflicts with what is stored",
            413: "Too large", 415: "Unsupported image format", 422: "Invalid request",
            503: "Model or store unavailable"}
    return {s: {"model": ErrorResponse, "description": text.get(s, "Error")} for s in statuses}
