"""Per-image embeddings read off a conv5 map: the paper's FC, or a BNNeck on its global mean.

Both are affine in the map, which is what lets the network compute x = E(g - F~) as
E(g) - E_lin(F~): the per-image E(g) once per image (the service caches it), only the linear
part per pair.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BNNeckEmbedding"]


class BNNeckEmbedding(nn.Module):
    """Global average pooling then a batch norm: ``(B, C, H, W)`` -> ``(B, C)``.

    The "BNNeck" of Luo et al. (2019, bag of tricks): a metric loss reads the pooled feature
    before the norm (:meth:`pooled`), an identity classifier and the cosine ranking read it
    after. Compared with the paper's FC on the flattened map (C x H x W inputs per output), it
    has no weight per location, so it cannot learn where the training cameras put people.
    In eval mode the norm is a per-channel affine map, ``scale * y + shift``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_features = channels
        self.bn = nn.BatchNorm1d(channels)
        self.bn.bias.requires_grad_(False)  # BNNeck: no shift, so cosine sees centred features

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the mean over locations ``(B, C)``."""
        return maps.mean(dim=(2, 3))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pooled(maps))

    def scale(self) -> torch.Tensor:
        """The eval-mode norm's per-channel factor ``(C,)``: the linear part of the map."""
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
