"""What can go wrong with a request, said without HTTP.

The ranker, the upload path and the store raise these; :mod:`service.errors` alone turns each
into an HTTP status and the JSON error body. ``code`` is the stable machine-readable code a
client sees, ``details`` what it may read besides the message (never bytes it sent).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DomainError", "GalleryNotFound", "ImageNotFound", "ImageRefused", "ImageConflict",
           "GalleryConflict", "RequestInvalid", "RequestTooLarge", "Overloaded",
           "WriteNotReplicated"]


class DomainError(Exception):
    """Base of the errors a client's request can meet; ``str(exc)`` is the message."""

    code = "error"

    def __init__(self, message: str, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:  # a more precise code than the class's
            self.code = code


class GalleryNotFound(DomainError):
    code = "gallery_not_found"

    def __init__(self, gallery: str) -> None:
        super().__init__(f"no gallery named {gallery!r}", {"gallery": gallery})
        self.gallery = gallery


class ImageNotFound(DomainError):
    code = "image_not_found"

    def __init__(self, gallery: str, image_id: str, code: str | None = None,
                 message: str | None = None) -> None:
        super().__init__(message or f"no image {image_id} in gallery {gallery!r}",
                         {"gallery": gallery, "image_id": image_id}, code)


class ImageRefused(DomainError):
    """An uploaded or probe image that cannot be used. ``reason``: ``invalid`` (unreadable,
    empty, NaN pixels), ``unsupported_format``, ``too_large`` (pixels or decode memory),
    ``too_many_bytes`` (the file itself), ``unencodable`` (the cache dtype cannot hold its
    tensors)."""

    REASONS = ("invalid", "unsupported_format", "too_large", "too_many_bytes", "unencodable")

    def __init__(self, reason: str, message: str, index: int | None = None,
                 filename: str | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"reason must be one of {self.REASONS}, not {reason!r}")
        super().__init__(message, {"index": index, "filename": filename})
        self.reason = reason
        self.code = {"invalid": "invalid_image", "unsupported_format": "unsupported_image_format",
                     "too_large": "image_too_large", "too_many_bytes": "payload_too_large",
                     "unencodable": "unencodable_image"}[reason]


class ImageConflict(DomainError):
    """An upload names an image id that the gallery already holds with other content."""

    code = "image_conflict"

    def __init__(self, gallery: str, image_ids: list[str]) -> None:
        super().__init__(f"gallery {gallery!r} already holds image id(s) "
                         f"{', '.join(image_ids[:5])}{' ...' if len(image_ids) > 5 else ''} "
                         "with other content; nothing of this upload was stored",
                         {"gallery": gallery, "image_ids": image_ids})


class GalleryConflict(DomainError):
    """A gallery is asked to be created with settings other than those it has."""

    code = "gallery_conflict"


class RequestInvalid(DomainError):
    """A request whose fields do not fit together (the message says which)."""

    code = "validation_error"


class RequestTooLarge(DomainError):
    """A request asks for more than the service takes at once (e.g. images per upload)."""

    code = "request_too_large"


class Overloaded(DomainError):
    """The service is at a bound it keeps (e.g. bytes of images decoded at once); a retry
    shortly after may pass."""

    code = "overloaded"


class WriteNotReplicated(DomainError):
    """A write was applied on the primary but fewer replicas than required acknowledged it
    in time; the client should retry (with the same image ids, an upload retry is safe)."""

    code = "write_not_replicated"
