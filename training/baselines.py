"""Non-learned baselines: query x gallery distances from colour histograms or raw pixels.

They give the floor any trained model must clear on the same protocol, with no training and no
model. Images are loaded through :func:`model.preprocess.load_image_tensor`, the decoding and
resizing the networks use, so a baseline and a network see the same pixels.

- ``histogram``: the image split into horizontal stripes (a person's head, torso, legs fall in
  different stripes whatever their pose across the width); per stripe, a joint HSV histogram,
  L1-normalised then square-rooted (so that the cosine of two vectors is the Bhattacharyya
  coefficient of the histograms), concatenated and L2-normalised; cosine distance.
- ``pixels``: the image shrunk to 32x16, each image's mean removed, L2-normalised; cosine
  distance (1 - the correlation of the two thumbnails).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image_tensor

from .data.records import ImageRecord

__all__ = ["BASELINES", "rgb_to_hsv", "histogram_features", "pixel_features",
           "cosine_distance", "baseline_features", "baseline_distance"]

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]


def _path(item: ImageRecord | str | Path) -> Path:
    return Path(item.path) if isinstance(item, ImageRecord) else Path(item)


def _load_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The network's input for ``path`` at ``size``, mapped back to RGB in [0, 1]: (3, H, W)."""
    return np.clip(load_image_tensor(path, size) * _STD + _MEAN, 0.0, 1.0)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """``(3, ...)`` RGB in [0, 1] -> ``(3, ...)`` HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = rgb
    value = rgb.max(axis=0)
    chroma = value - rgb.min(axis=0)
    saturation = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(value == r, (g - b) / safe,
                   np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(chroma > 0, (hue / 6.0) % 1.0, 0.0)
    return np.stack([hue, saturation, value])


def _l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def _progress(items, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="image", leave=False)


def histogram_features(images: Sequence[ImageRecord | str | Path], stripes: int = 6,
                       bins: tuple[int, int, int] = (8, 4, 4),
                       size: tuple[int, int] = (128, 64), progress: bool = False
                       ) -> np.ndarray:
    """Striped HSV histograms -> ``(N, stripes * prod(bins))``, rows of unit L2 norm."""
    height, _ = size
    if not 1 <= stripes <= height:
        raise ValueError(f"stripes must be in 1..{height} for images {size}, got {stripes}")
    bins_arr = np.asarray(bins)
    edges = np.linspace(0, height, stripes + 1).round().astype(int)
    rows = []
    for item in _progress(images, "histograms", progress):
        hsv = rgb_to_hsv(_load_rgb(_path(item), size))
        # Quantise each channel, then one joint bin index per pixel.
        q = np.minimum((hsv * bins_arr[:, None, None]).astype(np.int64),
                       bins_arr[:, None, None] - 1)
        joint = (q[0] * bins[1] + q[1]) * bins[2] + q[2]
        hists = [np.bincount(joint[lo:hi].ravel(), minlength=int(bins_arr.prod()))
                 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        hist = np.stack(hists).astype(np.float64)
        hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1)
        rows.append(np.sqrt(hist).ravel())
    return _l2_normalise(np.stack(rows)).astype(np.float32)


def pixel_features(images: Sequence[ImageRecord | str | Path],
                   size: tuple[int, int] = (32, 16), progress: bool = False) -> np.ndarray:
    """Downsampled normalised pixels -> ``(N, 3 * H * W)``, zero-mean rows of unit L2 norm."""
    rows = []
    for item in _progress(images, "pixels", progress):
        arr = load_image_tensor(_path(item), size).ravel().astype(np.float64)
        rows.append(arr - arr.mean())
    return _l2_normalise(np.stack(rows)).astype(np.float32)


BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "histogram": histogram_features,
    "pixels": pixel_features,
}


def cosine_distance(query_features: np.ndarray, gallery_features: np.ndarray) -> np.ndarray:
    """``1 - cos`` of L2-normalised rows -> ``(Q, G)`` float32 in [0, 2]."""
    return (1.0 - query_features @ gallery_features.T).astype(np.float32)


def baseline_features(name: str, images: Sequence[ImageRecord | str | Path],
                      progress: bool = False, **options) -> np.ndarray:
    """Features of the named baseline (see ``BASELINES``); ``options`` go to its function."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    if len(images) == 0:
        raise ValueError("no images to describe")
    return BASELINES[name](images, progress=progress, **options)


def baseline_distance(name: str, queries: Sequence[ImageRecord | str | Path],
                      gallery: Sequence[ImageRecord | str | Path], progress: bool = False,
                      **options) -> np.ndarray:
    """``(Q, G)`` cosine distances of the named baseline's features (lower = more alike).

    An image that is both a query and a gallery item is described once.
    """
    paths = [_path(x) for x in (*queries, *gallery)]
    unique = list(dict.fromkeys(paths))
    feats = baseline_features(name, unique, progress=progress, **options)
    row = {p: k for k, p in enumerate(unique)}
    q = feats[[row[p] for p in paths[:len(queries)]]]
    g = feats[[row[p] for p in paths[len(queries):]]]
    return cosine_distance(q, g)
