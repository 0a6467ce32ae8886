"""Spatial pooling of the joint map: F ``(P, C, H, W)`` -> F~ ``(P, C, H, W)``.

Every pooling exposes ``in_proj`` (a pointwise linear map at its start, or ``None``), ``core``
and ``out_proj`` (a pointwise linear map at its end, or ``None``), with
``forward(x) == out_proj(core(in_proj(x)))``. The network uses the pieces to fuse consecutive
linear maps (the gate's P with ``in_proj``; ``out_proj`` with the FC) on the per-pair path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FourDirectionRecurrence", "IRNNLayer", "StackedIRNN", "SpatialPyramidPooling",
    "GlobalAveragePooling", "StackedConv", "SpatialPooling", "compose_pointwise",
]


def compose_pointwise(*maps: nn.Conv2d | tuple[torch.Tensor, torch.Tensor] | None
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Compose pointwise linear maps, applied first to last, into one ``(weight, bias)``.

    Each map is a 1x1 ``nn.Conv2d``, a ``(weight (out, in), bias (out,))`` pair, or ``None``
    (skipped). Returns ``None`` when every map is ``None``. Differentiable in the weights.
    """
    weight = bias = None
    for m in maps:
        if m is None:
            continue
        if isinstance(m, nn.Conv2d):
            w = m.weight.flatten(1)
            b = m.bias if m.bias is not None else w.new_zeros(w.shape[0])
        else:
            w, b = m
        if weight is None:
            weight, bias = w, b
        else:
            weight, bias = w @ weight, w @ bias + b
    return None if weight is None else (weight, bias)


class SpatialPooling(nn.Module):
    """Interface of the spatial poolings (see the module docstring)."""

    # Declared, not assigned: a class-level ``None`` would hide submodules that nn.Module keeps
    # in ``_modules``. Every subclass sets both.
    in_proj: nn.Conv2d | None
    out_proj: nn.Conv2d | None
    core_channels: int  # channels that ``core`` returns

    def core(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def core_last(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`core` with channels last: ``(B, H, W, c)`` -> ``(B, H, W, core_channels)``.

        The per-pair path runs channels last, where the linear maps around the core are plain
        matrix products on the innermost axis. A pooling whose core has a cheaper
        channels-last form overrides this.
        """
        return self.core(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_proj is not None:
            x = self.in_proj(x)
        x = self.core(x)
        return x if self.out_proj is None else self.out_proj(x)


def _recur(xs: tuple[torch.Tensor, ...], weight_t: torch.Tensor, reverse: bool
           ) -> list[torch.Tensor]:
    """One ReLU recurrence over a sequence of steps: h_t = max(x_t + h_prev W^T, 0), h = 0
    before the first step.

    ``xs``: T steps, each ``(N, h)`` (N rows of hidden vectors); ``weight_t``: W transposed;
    ``reverse`` runs from the last step to the first. Returns the T states in step order
    (not run order), so a reversed direction needs no flipped copy of its input or output.
    """
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    states: list = [None] * len(xs)
    state = None
    for t in order:
        state = torch.relu(xs[t] if state is None else torch.addmm(xs[t], state, weight_t))
        states[t] = state
    return states


class FourDirectionRecurrence(nn.Module):
    """Four ReLU recurrences over a map: left->right, right->left, top->bottom, bottom->top.

    ``(B, h, H, W)`` -> ``(B, 4h, H, W)``, the four hidden maps concatenated in that order.
    Each direction has its own recurrent matrix, initialised to the identity (IRNN, Le et al.
    2015); the input-to-hidden map is outside (shared by the four directions).
    """

    directions = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.weight = nn.Parameter(torch.eye(hidden).repeat(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sweep(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def sweep(self, x: torch.Tensor) -> torch.Tensor:
        """The four recurrences, channels last: ``(B, H, W, h)`` -> ``(B, H, W, 4h)``.

        Each step of each direction is one matrix product on the step's ``(B*H, h)`` (a
        column of the map) or ``(B*W, h)`` (a row) block; reversed directions walk the same
        steps backwards, and each direction's states are put back in place by one stack. No
        flipped or transposed copy of a map is made: those were most of ONNX Runtime's time
        (docs/inference.md, "Channels last").
        """
        b, h, w, hidden = x.shape
        weight_t = self.weight.transpose(1, 2)
        # unbind, not x[:, t]: the backward of T indexing ops would write T full-size zeros.
        columns = [c.reshape(b * h, hidden) for c in x.unbind(2)]   # steps along the width
        rows = [r.reshape(b * w, hidden) for r in x.unbind(1)]      # steps along the height
        across = [torch.stack([s.view(b, h, hidden) for s in _recur(columns, weight_t[d], d == 1)],
                              dim=2) for d in (0, 1)]
        down = [torch.stack([s.view(b, w, hidden) for s in _recur(rows, weight_t[d], d == 3)],
                            dim=1) for d in (2, 3)]
        return torch.cat(across + down, dim=-1)


class IRNNLayer(nn.Module):
    """One 4-direction IRNN layer: 1x1 conv ``C -> h`` (shared by the four directions), the
    four recurrences, dropout on the concatenated hidden maps, 1x1 conv ``4h -> C``.

    ``(B, C, H, W)`` -> ``(B, C, H, W)``; output cell (i, j) sees row i and column j.
    Dropout drops whole hidden channels of a map (``nn.Dropout2d``): the same units at every
    step of a sweep, as variational dropout does for recurrent nets (Gal & Ghahramani 2016);
    it also draws H*W times fewer random numbers, which mattered on the CPU (a quarter of a
    training step went to per-element masks).
    """

    def __init__(self, channels: int = 512, hidden: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        self.in_conv = nn.Conv2d(channels, hidden, 1)
        self.recurrence = FourDirectionRecurrence(hidden)
        self.dropout = nn.Dropout2d(dropout)
        self.out_conv = nn.Conv2d(4 * hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_conv(self.dropout(self.recurrence(self.in_conv(x))))


class StackedIRNN(SpatialPooling):
    """Stacked 4-direction IRNN layers (two in the paper): every output cell sees every input
    cell. ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    ``forward`` equals running the layers one after another; ``core`` fuses each layer's
    ``out_conv`` with the next layer's ``in_conv`` (consecutive linear maps, ``4h -> C -> h``
    becomes ``4h -> h``), which is cheaper per pair and exact.
    """

    def __init__(self, channels: int = 512, hidden: int = 512, layers: int = 2,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("StackedIRNN needs at least one layer")
        self.layers = nn.ModuleList(IRNNLayer(channels, hidden, dropout) for _ in range(layers))
        self.core_channels = 4 * hidden

    # Properties, not attributes: assigning the submodules again would register them twice.
    @property
    def in_proj(self) -> nn.Conv2d:
        return self.layers[0].in_conv

    @property
    def out_proj(self) -> nn.Conv2d:
        return self.layers[-1].out_conv

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, H, W)`` (after ``in_proj``) -> ``(B, 4h, H, W)`` (before ``out_proj``)."""
        return self.core_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def core_last(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, h)`` (after ``in_proj``) -> ``(B, H, W, 4h)`` (before ``out_proj``).

        The fused convolutions between layers are matrix products on the innermost axis;
        nothing changes layout.
        """
        for k, layer in enumerate(self.layers):
            if k > 0:
                weight, bias = compose_pointwise(self.layers[k - 1].out_conv, layer.in_conv)
                x = torch.addmm(bias, x.flatten(0, 2), weight.t()).view(
                    *x.shape[:3], weight.shape[0])
            x = layer.recurrence.sweep(x)
            if self.training and layer.dropout.p > 0:
                # Dropout2d's rule (whole hidden maps per sample), channels last.
                keep = torch.ones(x.shape[0], 1, 1, x.shape[3], dtype=x.dtype,
                                  device=x.device)
                x = x * F.dropout(keep, layer.dropout.p, training=True)
        return x


class SpatialPyramidPooling(SpatialPooling):
    """Spatial pyramid pooling (He et al. 2014) kept as a map: average-pool to each level's
    grid (2x2 and 1x1 by default), tile each back to H x W, concatenate, 1x1 conv back to C.
    ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, channels: int = 512, levels: tuple[int, ...] = (2, 1)) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.core_channels = channels * len(self.levels)
        self.in_proj = None
        self.out_proj = nn.Conv2d(self.core_channels, channels, 1)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        tiles = [F.interpolate(F.adaptive_avg_pool2d(x, level), size=size, mode="nearest")
                 for level in self.levels]
        return torch.cat(tiles, dim=1)


class GlobalAveragePooling(SpatialPooling):
    """Global average pooling tiled back over the map: every cell gets the map's mean.
    ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, channels: int = 512) -> None:
        super().__init__()
        self.core_channels = channels
        self.in_proj = self.out_proj = None

    def core(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)


class StackedConv(SpatialPooling):
    """Two stacked 3x3 convolutions (``C -> hidden``, ReLU, ``hidden -> C``).
    ``(B, C, H, W)`` -> ``(B, C, H, W)``; each output cell sees a 5x5 neighbourhood.
    """

    def __init__(self, channels: int = 512, hidden: int = 512) -> None:
        super().__init__()
        self.core_channels = channels
        self.in_proj = self.out_proj = None
        self.convs = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(hidden, channels, 3, padding=1))

    def core(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)
