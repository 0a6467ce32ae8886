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
           "decode_image", "decode_bytes", "header_decode_bytes", "preprocess",
           "load_image_tensor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# MPO: the multi-picture JPEG of many phones and cameras, read as its first picture.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM"})
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


_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Bytes per pixel of Pillow's decoded buffer, by mode (4 for anything not listed).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3,
               "LAB": 3, "HSV": 3, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_ROWS = 256  # rows per step when a wide greyscale image is scaled to 8 bits


def decode_bytes(width: int, height: int, mode: str) -> int:
    """The most memory decoding an image of this size and mode to RGB takes at once, in
    bytes: the decoded buffer, plus the RGB (or RGBA and RGB) copy made from it."""
    pixels = width * height
    decoded = _MODE_BYTES.get(mode, 4) * pixels
    if mode in _WIDE:  # 8-bit greyscale, then RGB (scaled a few rows at a time)
        return decoded + pixels + 3 * pixels
    if mode in ("P", "LA", "PA", "La", "RGBA", "RGBa"):  # through RGBA onto an RGB canvas
        return decoded + 4 * pixels + 3 * pixels
    return decoded + 3 * pixels


def header_decode_bytes(data: bytes) -> int:
    """:func:`decode_bytes` of an encoded image, from its header alone (nothing decoded); 0
    when the header cannot be read (decoding then fails with the reason)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return decode_bytes(*img.size, img.mode)
    except Exception:  # Pillow raises many types for broken headers
        return 0


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale -> RGB, the value range scaled to 8 bits (not
    clipped), a few rows at a time: no float64 copy of a big image. NaN or infinite pixels
    are refused: they have no brightness, and scaling them would blank the whole image."""
    arr = np.asarray(img)  # Pillow's buffer viewed as an array: uint16, int32 or float32
    lo = hi = None
    for start in range(0, arr.shape[0], _ROWS):
        rows = arr[start:start + _ROWS]
        if rows.dtype.kind == "f" and not np.isfinite(rows).all():
            raise ImageDecodeError("image has NaN or infinite pixel values", "unreadable")
        r_lo, r_hi = rows.min(), rows.max()
        lo = r_lo if lo is None else min(lo, r_lo)
        hi = r_hi if hi is None else max(hi, r_hi)
    out = np.zeros(arr.shape, dtype=np.uint8)
    if hi > lo:
        scale = 255.0 / (float(hi) - float(lo))
        for start in range(0, arr.shape[0], _ROWS):
            rows = arr[start:start + _ROWS].astype(np.float32)
            out[start:start + _ROWS] = np.rint((rows - np.float32(lo)) * np.float32(scale))
    return Image.fromarray(out, "L").convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE:
        return _wide_to_rgb(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(source: bytes | str | Path | BinaryIO,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_decode_bytes: int | None = None) -> Image.Image:
    """Decode bytes, a path or a file object into an upright 8-bit RGB image.

    Applies the EXIF orientation; converts CMYK, 16-bit, float, palette and alpha images to
    RGB; a multi-picture file (MPO, animated GIF) gives its first picture. Raises
    :class:`ImageDecodeError` for empty, truncated, non-image or unsupported input, for NaN or
    infinite pixels, and, checked from the header before any pixel is decoded, for images of
    more than ``max_pixels`` pixels or whose decoding would take more than
    ``max_decode_bytes`` bytes (:func:`decode_bytes`).
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
            cost = decode_bytes(width, height, img.mode)
            if max_decode_bytes is not None and cost > max_decode_bytes:
                raise ImageDecodeError(
                    f"decoding this {width}x{height} {img.mode} image takes "
                    f"{cost / 2**20:.0f} MiB, more than the {max_decode_bytes / 2**20:.0f} "
                    "MiB allowed per image", "too_many_pixels")
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
