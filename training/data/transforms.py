"""Training augmentation on normalised image tensors ``(3, H, W)``: the paper's flip and shift."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["shift_image", "FlipShift"]


def shift_image(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move ``image`` ``(3, H, W)`` by ``dx`` pixels right and ``dy`` down, repeating the border
    pixels into the space it leaves (the paper pads the borders)."""
    if dx == 0 and dy == 0:
        return image
    _, h, w = image.shape
    padded = F.pad(image[None], (abs(dx), abs(dx), abs(dy), abs(dy)), mode="replicate")[0]
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[:, top:top + h, left:left + w]


class FlipShift:
    """Random horizontal flip (p = 0.5), then a shift of ``-sx, 0 or +sx`` pixels horizontally
    and ``-sy, 0 or +sy`` vertically, each equally likely: the paper's flipped, left/right and
    up/down shifted copies, drawn at random per sample instead of stored."""

    def __init__(self, flip: bool = True, shift: tuple[int, int] = (5, 10),
                 generator: torch.Generator | None = None) -> None:
        self.flip = flip
        self.sx, self.sy = shift
        self.generator = generator

    def _choice(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.flip and self._choice(2):
            image = image.flip(-1)
        dx = (self._choice(3) - 1) * self.sx
        dy = (self._choice(3) - 1) * self.sy
        return shift_image(image, dx, dy)
