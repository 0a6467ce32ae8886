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


def apply_pointwise(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``(P, c_in, H, W)`` -> ``(P, c_out, H, W)`` through a ``(weight, bias)`` pair."""
    if wb is None:
        return x
    weight, bias = wb
    return F.conv2d(x, weight[:, :, None, None], bias)


class SpatialPooling(nn.Module):
    """Interface of the spatial poolings (see the module docstring)."""

    # Declared, not assigned: a class-level ``None`` would hide submodules that nn.Module keeps
    # in ``_modules``. Every subclass sets both.
    in_proj: nn.Conv2d | None
    out_proj: nn.Conv2d | None
    core_channels: int  # channels that ``core`` returns

    def core(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_proj is not None:
            x = self.in_proj(x)
        x = self.core(x)
        return x if self.out_proj is None else self.out_proj(x)


def _sweep(steps: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """ReLU recurrences along the first axis, all directions and rows at once.

    ``steps`` ``(T, D, N, h)``: D directions, each a sequence of T steps for N rows of hidden
    vectors, h_t = max(W_d h_{t-1} + x_t, 0), h_{-1} = 0; ``weight_t`` ``(D, h, h)`` holds each
    W_d transposed (rows of hidden vectors: ``h @ W^T``). Returns the states, same layout. The
    loop over the T steps is the only Python loop; each step is one batched GEMM over
    contiguous memory.
    """
    # unbind, not steps[t]: the backward of T indexing ops would write T full-size zero tensors.
    xs = steps.unbind(0)
    state = torch.relu(xs[0])
    states = [state]
    for x in xs[1:]:
        state = torch.relu(torch.baddbmm(x, state, weight_t))
        states.append(state)
    return torch.stack(states)


def to_sequence(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> the recurrences' layout ``(W, B, H, C)``: a step along the width is a
    contiguous block, and channels are innermost so that every layout change below moves whole
    hidden vectors (ONNX Runtime's transposes of small innermost axes are slow)."""
    return x.permute(3, 0, 2, 1)


def from_sequence(seq: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_sequence`: ``(W, B, H, C)`` -> ``(B, C, H, W)``."""
    return seq.permute(1, 3, 2, 0)


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
        return from_sequence(self.sweep(to_sequence(x)))

    def sweep(self, seq: torch.Tensor) -> torch.Tensor:
        """The four recurrences in the sequence layout: ``(W, B, H, h)`` -> ``(W, B, H, 4h)``.

        Reversed directions run on the input reversed along its step axis (an outer axis:
        whole blocks move), stacked beside the forward ones so that one GEMM per step serves
        both; a square map sweeps all four directions in one loop.
        """
        w, b, h, hidden = seq.shape
        weight_t = self.weight.transpose(1, 2)
        cols = seq.transpose(0, 2)                                   # (H, B, W, h)
        rows_in = torch.stack([seq, seq.flip(0)], dim=1).reshape(w, 2, b * h, hidden)
        cols_in = torch.stack([cols, cols.flip(0)], dim=1).reshape(h, 2, b * w, hidden)
        if w == h:
            swept = _sweep(torch.cat([rows_in, cols_in], dim=1), weight_t)
            rows_out, cols_out = swept[:, :2], swept[:, 2:]
        else:
            rows_out = _sweep(rows_in, weight_t[:2])
            cols_out = _sweep(cols_in, weight_t[2:])
        rows_out = rows_out.reshape(w, 2, b, h, hidden)
        cols_out = cols_out.reshape(h, 2, b, w, hidden)
        return torch.cat([rows_out[:, 0], rows_out[:, 1].flip(0),
                          cols_out[:, 0].transpose(0, 2), cols_out[:, 1].flip(0).transpose(0, 2)],
                         dim=-1)


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
        """``(B, h, H, W)`` (after ``in_proj``) -> ``(B, 4h, H, W)`` (before ``out_proj``).

        Runs in the sequence layout (:func:`to_sequence`) from the first layer to the last:
        two layout changes in all; the fused convolutions between layers are matrix products
        on the innermost axis.
        """
        seq = to_sequence(x)
        for k, layer in enumerate(self.layers):
            if k > 0:
                weight, bias = compose_pointwise(self.layers[k - 1].out_conv, layer.in_conv)
                seq = torch.addmm(bias, seq.flatten(0, 2), weight.t()).view(
                    *seq.shape[:3], weight.shape[0])
            seq = layer.recurrence.sweep(seq)
            if self.training and layer.dropout.p > 0:
                # Dropout2d's rule (whole hidden maps per sample) in the sequence layout.
                keep = torch.ones(1, seq.shape[1], 1, seq.shape[3], dtype=seq.dtype,
                                  device=seq.device)
                seq = seq * F.dropout(keep, layer.dropout.p, training=True)
        return from_sequence(seq)


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
