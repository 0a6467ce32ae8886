"""Small previews of gallery images, stored with each image so that people can see a ranking.

A thumbnail is the upright image scaled (aspect kept) to fit ``THUMBNAIL_BOX`` and encoded as
a JPEG: a few kilobytes whatever the upload, next to the tens of kilobytes of tensors each
item already has in the store. It is stored as one more blob of the item (``THUMBNAIL_FIELD``)
and served by ``GET /v1/galleries/{gallery}/images/{image_id}/thumbnail``.
"""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["THUMBNAIL_FIELD", "THUMBNAIL_BOX", "THUMBNAIL_MEDIA_TYPE", "make_thumbnail"]

THUMBNAIL_FIELD = "thumbnail"
THUMBNAIL_BOX = (96, 192)  # (width, height): a pedestrian crop's shape
THUMBNAIL_MEDIA_TYPE = "image/jpeg"
_QUALITY = 85


def make_thumbnail(image: Image.Image) -> bytes:
    """An RGB image (as :func:`model.preprocess.decode_image` returns it) -> JPEG bytes of at
    most ``THUMBNAIL_BOX`` pixels; never scaled up."""
    thumb = image.convert("RGB")
    thumb.thumbnail(THUMBNAIL_BOX, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=_QUALITY, optimize=True)
    return out.getvalue()
