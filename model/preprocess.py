"""Image decoding and preprocessing shared by training, export checks and the service.

Torch-free (NumPy and Pillow only) so that the ONNX service runs without PyTorch. Every path
that turns an image into network input goes through :func:`preprocess`, so training and serving
see the same tensor for the same image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageDecodeError", "ALLOWED_FORMATS",
           "decode_image", "preprocess", "load_image_tensor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM"})
DEFAULT_MAX_PIXELS = 40_000_000  # a person crop is far smaller; more is a decompression bomb

# Transparent pixels become the normalisation mean, which is zero after normalising: "no
# evidence" rather than a white or black backdrop that the network would see as colour.
_BACKGROUND = tuple(round(255 * m) for m in IMAGENET_MEAN)


class ImageDecodeError(ValueError):
    """The bytes are not an image this service can use; the message says why.

    ``reason`` is one of ``REASONS``: ``empty``, ``unsupported_format``, ``too_many_pixels``,
    ``unreadable`` (not an image, truncated, corrupt), so callers can map it (e.g. to HTTP).
    """

    REASONS = ("empty", "unsupported_format", "too_many_pixels", "unreadable")

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        if reason not in self.REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the value range to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(source: bytes | str | Path | BinaryIO,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes, a path or a file object into an upright 8-bit RGB image.

    Applies the EXIF orientation; converts CMYK, 16-bit, palette and alpha images to RGB.
    Raises :class:`ImageDecodeError` for empty, truncated, non-image or unsupported input and
    for images of more than ``max_pixels`` pixels (checked before the pixels are decoded).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("empty file", "empty")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            if img.format not in ALLOWED_FORMATS:
                raise ImageDecodeError(f"unsupported image format {img.format}; "
                                       f"use one of {', '.join(sorted(ALLOWED_FORMATS))}",
                                       "unsupported_format")
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image of {width}x{height} pixels is larger than the "
                                       f"{max_pixels} pixels allowed", "too_many_pixels")
            if width == 0 or height == 0:
                raise ImageDecodeError("image has no pixels")
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large: {exc}", "too_many_pixels") from exc
    except FileNotFoundError:
        raise
    except Image.UnidentifiedImageError as exc:
        # Pillow's message names an in-memory buffer object, which tells a client nothing
        raise ImageDecodeError("not an image (no known image format)", "unreadable") from exc
    except Exception as exc:  # Pillow raises many types for broken data
        raise ImageDecodeError(f"not a readable image ({type(exc).__name__}: {exc})",
                               "unreadable") from exc
    return _to_rgb(img)


def preprocess(image: Image.Image, size: tuple[int, int],
               mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD) -> np.ndarray:
    """An RGB image -> normalised float32 array ``(3, H, W)`` for ``size = (H, W)``.

    Resized straight to the network's input size (bilinear), as re-id crops usually are.
    """
    height, width = size
    if image.mode != "RGB":
        image = _to_rgb(image)
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(resized, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_image_tensor(source: bytes | str | Path | BinaryIO | Image.Image, size: tuple[int, int],
                      mean: tuple[float, ...] = IMAGENET_MEAN,
                      std: tuple[float, ...] = IMAGENET_STD,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`decode_image` then :func:`preprocess`: the one path from a file to input.
    An already decoded image (from :func:`decode_image`) is preprocessed as it is."""
    image = source if isinstance(source, Image.Image) else decode_image(source, max_pixels)
    return preprocess(image, size, mean, std)
