"""Fusion of the two streams' conv5 maps into one joint map F, location by location.

Every fusion splits into a per-image part and a per-pair part, which is what lets the service
cache the gallery side:

- ``embed_a(g_a)`` / ``embed_b(g_b)``: per image, ``(B, C, H, W)`` -> ``(B, m, H, W)``;
- ``combine(e_a, e_b)``: per pair, ``(P, m, H, W)`` x2 -> ``(P, j, H, W)``;
- ``projection``: a pointwise linear map ``j -> out_channels`` (or ``None``), applied after
  ``combine``. It is kept apart so the network can fuse it with the next pointwise map.

``forward(g_a, g_b)`` runs the three in order and is the paper's F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiplicativeGate", "HadamardFusion", "BilinearFusion", "Fusion"]


class Fusion(nn.Module):
    """Interface shared by the fusions (see the module docstring)."""

    out_channels: int
    projection: nn.Conv2d | None

    def embed_a(self, g_a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_b(self, g_b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
        """``(P, C, H, W)`` x2 -> F ``(P, out_channels, H, W)``."""
        joint = self.combine(self.embed_a(g_a), self.embed_b(g_b))
        return joint if self.projection is None else self.projection(joint)


class MultiplicativeGate(Fusion):
    """The multiplicative integration gate, Eq. 2 (``sigmoid=True``) or Eq. 1 (``False``).

    F(i,j,:) = P^T( s(U^T g_A(i,j,:) + b_A) * s(V^T g_B(i,j,:) + b_B) ) + b, where s is the
    sigmoid or the identity; U, V are 1x1 convolutions ``C -> embed_dim`` and P a 1x1
    convolution ``embed_dim -> C`` with bias b. Each side is the other's gate (Eq. 3).
    """

    def __init__(self, in_channels: int = 512, embed_dim: int = 512, sigmoid: bool = True,
                 out_channels: int | None = None) -> None:
        super().__init__()
        self.out_channels = out_channels or in_channels
        self.sigmoid = sigmoid
        self.U = nn.Conv2d(in_channels, embed_dim, 1)
        self.V = nn.Conv2d(in_channels, embed_dim, 1)
        self.projection = nn.Conv2d(embed_dim, self.out_channels, 1)

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) if self.sigmoid else x

    def embed_a(self, g_a: torch.Tensor) -> torch.Tensor:
        return self._activate(self.U(g_a))

    def embed_b(self, g_b: torch.Tensor) -> torch.Tensor:
        return self._activate(self.V(g_b))

    def combine(self, e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        return e_a * e_b


class HadamardFusion(Fusion):
    """The plain multiplicative-integration ("MI") baseline: F = g_A * g_B, no parameters."""

    def __init__(self, in_channels: int = 512) -> None:
        super().__init__()
        self.out_channels = in_channels
        self.projection = None

    def embed_a(self, g_a: torch.Tensor) -> torch.Tensor:
        return g_a

    def embed_b(self, g_b: torch.Tensor) -> torch.Tensor:
        return g_b

    def combine(self, e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        return e_a * e_b


def _signed_sqrt(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # Shifted so the value is 0 at 0 while the gradient stays finite there.
    return torch.sign(x) * (torch.sqrt(x.abs() + eps) - eps ** 0.5)


class BilinearFusion(Fusion):
    """The B-CNN baseline kept spatial: the outer product of the two streams at each location.

    A full 512x512 outer product per location would give 262,144 channels, which no spatial
    pooling after it can afford, so each stream is first reduced to ``rank`` channels by a 1x1
    convolution. B-CNN's signed square root and l2 normalisation are applied per location;
    both factor over the outer product (sqrt|a_i b_j| = sqrt|a_i| sqrt|b_j|,
    |a (x) b| = |a| |b|), so they run per image and the gallery side stays cacheable.
    ``projection`` maps the ``rank**2`` outer-product channels back to ``out_channels``.
    """

    def __init__(self, in_channels: int = 512, rank: int = 64,
                 out_channels: int | None = None) -> None:
        super().__init__()
        self.out_channels = out_channels or in_channels
        self.rank = rank
        self.U = nn.Conv2d(in_channels, rank, 1)
        self.V = nn.Conv2d(in_channels, rank, 1)
        self.projection = nn.Conv2d(rank * rank, self.out_channels, 1)

    @staticmethod
    def _normalise(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(_signed_sqrt(x), dim=1)

    def embed_a(self, g_a: torch.Tensor) -> torch.Tensor:
        return self._normalise(self.U(g_a))

    def embed_b(self, g_b: torch.Tensor) -> torch.Tensor:
        return self._normalise(self.V(g_b))

    def combine(self, e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        p, r, h, w = e_a.shape[0], self.rank, e_a.shape[2], e_a.shape[3]
        p = max(p, e_b.shape[0])
        outer = e_a.unsqueeze(2) * e_b.unsqueeze(1)  # (P, r, r, H, W)
        return outer.reshape(p, r * r, h, w)
