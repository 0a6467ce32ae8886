"""Training augmentation on normalised image tensors: the paper's flip and shift.

It runs on whole batches ``(B, 3, H, W)`` where they are (on the GPU when training there), so
the loader only has to deliver images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["shift_image", "FlipShift", "RandomErasing"]


def shift_image(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move ``image`` ``(..., 3, H, W)`` by ``dx`` pixels right and ``dy`` down, repeating the
    border pixels into the space it leaves (the paper pads the borders)."""
    if dx == 0 and dy == 0:
        return image
    h, w = image.shape[-2:]
    batch = image.reshape(-1, *image.shape[-3:])
    padded = F.pad(batch, (abs(dx), abs(dx), abs(dy), abs(dy)), mode="replicate")
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[..., top:top + h, left:left + w].reshape(image.shape)


class FlipShift:
    """Random horizontal flip (p = 0.5), then a shift of ``-sx, 0 or +sx`` pixels horizontally
    and ``-sy, 0 or +sy`` vertically, each equally likely, drawn per image: the paper's
    flipped, left/right and up/down shifted copies, drawn at random instead of stored.

    Takes one image ``(3, H, W)`` or a batch ``(B, 3, H, W)`` on any device; the draws come
    from ``generator`` on the CPU (a few numbers per image), the pixels never leave the device.
    """

    def __init__(self, flip: bool = True, shift: tuple[int, int] = (5, 10),
                 generator: torch.Generator | None = None) -> None:
        self.flip = flip
        self.sx, self.sy = shift
        self.generator = generator

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            return self(images[None])[0]
        n = images.shape[0]
        draws = torch.randint(6, (n, 3), generator=self.generator)
        flip = (draws[:, 0] % 2 == 1) & self.flip
        dx = (draws[:, 1] % 3 - 1) * self.sx
        dy = (draws[:, 2] % 3 - 1) * self.sy
        if flip.any():
            index = flip.nonzero()[:, 0].to(images.device)
            images = images.index_copy(0, index, images.index_select(0, index).flip(-1))
        out = images
        # One batched shift per (dx, dy) pair that was drawn: at most nine.
        for sx, sy in torch.unique(torch.stack([dx, dy], 1), dim=0).tolist():
            if sx == 0 and sy == 0:
                continue
            index = ((dx == sx) & (dy == sy)).nonzero()[:, 0].to(images.device)
            out = out.index_copy(0, index, shift_image(images.index_select(0, index), sx, sy))
        return out


class RandomErasing:
    """Random erasing (Zhong et al. 2020) on a batch ``(B, 3, H, W)``: with probability ``p``
    per image, one rectangle of 2-40% of its area and aspect ratio 0.3-3.3 is set to 0 (the
    normalised mean colour). Draws come from ``generator`` on the CPU."""

    def __init__(self, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                 ratio: tuple[float, float] = (0.3, 3.3),
                 generator: torch.Generator | None = None) -> None:
        self.p, self.area, self.ratio, self.generator = p, area, ratio, generator

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return images
        n, _, h, w = images.shape
        u = torch.rand(n, 5, generator=self.generator)
        out = images.clone()
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for k in range(n):
            if u[k, 0] >= self.p:
                continue
            area = h * w * (self.area[0] + (self.area[1] - self.area[0]) * u[k, 1].item())
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[k, 2].item())
            eh = min(h, max(1, round(math.sqrt(area * aspect))))
            ew = min(w, max(1, round(math.sqrt(area / aspect))))
            top = int(u[k, 3].item() * (h - eh + 1))
            left = int(u[k, 4].item() * (w - ew + 1))
            out[k, :, top:top + eh, left:left + ew] = 0
        return out
