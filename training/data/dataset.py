"""PyTorch datasets over image records, through the shared preprocessing of ``model.preprocess``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image_tensor

from .records import ImageRecord

__all__ = ["ReIDImages"]


class ReIDImages(Dataset):
    """Records -> ``(image (3, H, W), pid, camid, index)``; ``transform`` augments the tensor.

    ``cache=True`` keeps each decoded, resized, normalised image in memory after its first
    read (about 100 kB at 128x64), so epochs after the first decode nothing.
    """

    def __init__(self, records: Sequence[ImageRecord], size: tuple[int, int],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, cache: bool = False) -> None:
        self.records = list(records)
        self.size = tuple(size)
        self.transform = transform
        self.mean, self.std = mean, std
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def preload(self, progress: bool = False) -> None:
        """Decode every image into the cache now (``cache=True`` only)."""
        if self._cache is None:
            raise ValueError("preload needs a dataset built with cache=True")
        indices = range(len(self))
        if progress:
            from tqdm import tqdm
            indices = tqdm(indices, desc="decode", unit="image", leave=False)
        for index in indices:
            self[index]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        image = self._cache.get(index) if self._cache is not None else None
        if image is None:
            image = torch.from_numpy(load_image_tensor(rec.path, self.size, self.mean, self.std))
            if self._cache is not None:
                self._cache[index] = image
        if self.transform is not None:
            image = self.transform(image)
        return image, rec.pid, rec.camid, index
