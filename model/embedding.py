"""Per-image embeddings read off a conv5 map: the paper's FC, or a BNNeck on region means.

Both are affine in the map, which is what lets the network compute x = E(g - F~) as
E(g) - E_lin(F~): the per-image E(g) once per image (the service caches it), only the linear
part per pair.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BNNeckEmbedding"]


class BNNeckEmbedding(nn.Module):
    """Region means then a batch norm: ``(B, C, H, W)`` -> ``(B, R * C)``.

    The "BNNeck" of Luo et al. (2019, bag of tricks): a metric loss reads the pooled feature
    before the norm (:meth:`pooled`), an identity classifier and the cosine ranking read it
    after. The regions are the whole map (the global mean) and, with ``stripes`` > 0, that many
    horizontal bands of equal height (the part features of PCB / MGN: each band learns to tell
    people apart by itself, head to feet), so R = 1 + stripes. Compared with the paper's FC on
    the flattened map (C x H x W inputs per output), it has no weight per location, so it
    cannot learn where the training cameras put people. Every region mean is linear in the map
    and in eval mode the norm is a per-feature affine map, ``scale * y + shift``.
    """

    def __init__(self, channels: int, stripes: int = 0) -> None:
        super().__init__()
        if stripes < 0:
            raise ValueError(f"stripes must be >= 0, not {stripes}")
        self.channels = channels
        self.stripes = stripes
        self.regions = 1 + stripes
        self.out_features = channels * self.regions
        self.bn = nn.BatchNorm1d(self.out_features)
        self.bn.bias.requires_grad_(False)  # BNNeck: no shift, so cosine sees centred features

    def region_means(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the mean of each region ``(B, R, C)``: the whole map first,
        then the bands from the top. ``H`` must be a multiple of ``stripes``."""
        whole = maps.mean(dim=(2, 3))[:, None]
        if not self.stripes:
            return whole
        _, c, h, w = maps.shape
        if h % self.stripes:
            raise ValueError(f"a map of height {h} does not split into {self.stripes} stripes")
        # A reshape, not adaptive pooling: it exports to ONNX for any batch and stays exact.
        bands = maps.reshape(-1, c, self.stripes, (h // self.stripes) * w).mean(dim=3)
        return torch.cat([whole, bands.transpose(1, 2)], dim=1)

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the region means side by side ``(B, R * C)``."""
        return self.region_means(maps).flatten(1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pooled(maps))

    def scale(self) -> torch.Tensor:
        """The eval-mode norm's per-feature factor ``(R * C,)``: the linear part of the map."""
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
