"""The matching networks: a per-image part, a cacheable per-gallery-image part, a per-pair part.

For a probe image (stream A) and a gallery image (stream B):

1. ``encode(images, stream)``: trunk, ``(B, 3, H, W)`` -> conv5 ``(B, C, K1, K2)``.
2. ``prepare_probe(maps)`` / ``prepare_gallery(maps)``: everything that depends on one image
   only, as a named tuple of tensors (for the DSMI gate: s(U^T g_A) or s(V^T g_B), and the FC
   applied to g). The gallery side is what the service caches.
3. ``score(probe, gallery)``: one probe against N gallery items in one batched call -> ``(N,)``.

Training uses ``similarity_matrix(images)``: all pairs of a batch of n images -> ``(n, n)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import BNNeckEmbedding
from .fusion import Fusion
from .pooling import SpatialPooling, compose_pointwise

__all__ = ["StreamFeatures", "EmbeddingFeatures", "MatchingNetwork",
           "TwoStreamMatchingNetwork", "FCCNN"]


class StreamFeatures(NamedTuple):
    """The per-image side of a pair for the two-stream networks.

    ``joint``: the fusion's per-image embedding ``(B, m, K1, K2)`` (s(V^T g_B) for the gate);
    ``embedding``: FC(g) + its bias, ``(B, fc_dim)``. Because the FC is linear,
    x = FC(g - F~) = FC(g) - W F~, so only W F~ is computed per pair.
    """

    joint: torch.Tensor
    embedding: torch.Tensor


class EmbeddingFeatures(NamedTuple):
    """The per-image side for FC-CNN: its embedding ``(B, fc_dim)``."""

    embedding: torch.Tensor


Features = StreamFeatures | EmbeddingFeatures


def _select(features: Features, index: torch.Tensor | slice) -> Features:
    return type(features)(*(t[index] for t in features))


class MatchingNetwork(nn.Module):
    """What every variant offers; subclasses define the per-image and per-pair parts."""

    input_size: tuple[int, int]
    map_size: tuple[int, int]
    variant: str = ""
    build_args: dict = {}
    # Outside training, average each map with the map of the mirrored image, mirrored back
    # (test-time flip: the trunk runs twice). Set after building; export bakes it in.
    mirror_average: bool = False

    def encode(self, images: torch.Tensor, stream: str = "a") -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> conv5 maps ``(B, C, K1, K2)``.

        ``stream`` picks the trunk (``"a"``: probe side, ``"b"``: gallery side); it only
        matters for variants whose two streams do not share weights.
        """
        trunk = self.trunks[self._stream_index(stream)]
        maps = trunk(images)
        if self.mirror_average and not self.training:
            maps = 0.5 * (maps + trunk(images.flip(-1)).flip(-1))
        return maps

    def _stream_index(self, stream: str) -> int:
        if stream not in ("a", "b"):
            raise ValueError(f"stream must be 'a' or 'b', not {stream!r}")
        return 1 if stream == "b" and len(self.trunks) > 1 else 0

    @property
    def shares_trunk(self) -> bool:
        return len(self.trunks) == 1

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        # The FC was built for the configured input size; maps of another size are resampled
        # to its grid so that a model still scores them (a no-op at the configured size).
        if tuple(x.shape[-2:]) == tuple(self.map_size):
            return x
        return F.adaptive_avg_pool2d(x, self.map_size)

    def prepare_probe(self, maps: torch.Tensor) -> Features:
        raise NotImplementedError

    def prepare_gallery(self, maps: torch.Tensor) -> Features:
        raise NotImplementedError

    def head_weights(self) -> object:
        """Weights derived once per scoring call (fused linear maps); ``None`` if unused."""
        return None

    def score_features(self, probe: Features, gallery: Features,
                       head_weights: object = None) -> torch.Tensor:
        """Similarity of aligned (or broadcast, batch 1) per-image features -> ``(P,)``."""
        raise NotImplementedError

    def score(self, probe: torch.Tensor | Features, gallery: torch.Tensor | Features,
              batch_size: int | None = None) -> torch.Tensor:
        """One probe against N gallery items -> similarities ``(N,)``.

        ``probe``: a conv5 map ``(1, C, K1, K2)`` or ``prepare_probe``'s output; ``gallery``:
        maps ``(N, C, K1, K2)`` or ``prepare_gallery``'s output (the same results either way).
        ``batch_size`` bounds how many pairs are in flight at once.
        """
        if isinstance(probe, torch.Tensor):
            probe = self.prepare_probe(probe)
        if isinstance(gallery, torch.Tensor):
            gallery = self.prepare_gallery(gallery)
        if probe[0].shape[0] != 1:
            raise ValueError(f"score takes one probe, got a batch of {probe[0].shape[0]}")
        n = gallery[0].shape[0]
        weights = self.head_weights()
        step = batch_size or max(n, 1)
        parts = [self.score_features(probe, _select(gallery, slice(k, k + step)), weights)
                 for k in range(0, n, step)]
        return torch.cat(parts) if parts else gallery[0].new_zeros(0)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """Aligned pairs of images ``(B, 3, H, W)`` x2 -> similarities ``(B,)``: the whole
        two-stream network per pair, with nothing shared between pairs."""
        probe = self.prepare_probe(self.encode(images_a, "a"))
        gallery = self.prepare_gallery(self.encode(images_b, "b"))
        return self.score_features(probe, gallery, self.head_weights())

    def similarity_matrix(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of n images -> ``(n, n)`` similarities of all pairs, for training.

        Each unordered pair is scored once, as (i, j) with i <= j, image i in stream A: S is not
        symmetric in its streams (U != V), and scoring both orders would double the per-pair
        work for a second estimate of the same match. The result is mirrored, so it is
        symmetric; the diagonal holds each image scored against itself.
        """
        maps_a = self.encode(images, "a")
        maps_b = maps_a if self.shares_trunk else self.encode(images, "b")
        return self.similarity_matrix_of_maps(maps_a, maps_b)

    def similarity_matrix_of_maps(self, maps_a: torch.Tensor, maps_b: torch.Tensor
                                  ) -> torch.Tensor:
        """:meth:`similarity_matrix` from the n images' conv5 maps of each stream
        ``(n, C, K1, K2)``: a fixed trunk's maps are computed once and reused (phase 2)."""
        n = maps_a.shape[0]
        probe, gallery = self.prepare_probe(maps_a), self.prepare_gallery(maps_b)
        rows, cols = torch.triu_indices(n, n, device=maps_a.device)
        scores = self.score_features(_select(probe, rows), _select(gallery, cols),
                                     self.head_weights())
        sim = scores.new_zeros(n, n)
        sim = sim.index_put((rows, cols), scores).index_put((cols, rows), scores)
        return sim


class HeadWeights(NamedTuple):
    entry: tuple[torch.Tensor, torch.Tensor] | None  # projection P then the pooling's in_proj
    tail: tuple[torch.Tensor, torch.Tensor]          # the FC, or out_proj then FC: weight, bias
    tail_fused: bool  # does ``tail`` include out_proj? Its inputs are then in (H, W, c) order
    # A BNNeck embedding: ``tail`` (out_proj) reads each region's mean of the core output
    # ``(P, R, c)`` (the means commute with the linear maps, so they are taken first), then
    # the norm's per-feature factor ``(R * C,)`` scales it
    tail_scale: torch.Tensor | None = None


class TwoStreamMatchingNetwork(MatchingNetwork):
    """Two-stream trunk, fusion, spatial pooling, FC on g - F~ and cosine similarity.

    With the gate and the stacked IRNN this is DSMI; other fusions and poolings give the
    paper's baselines. ``trunk_b=None`` shares ``trunk_a`` between the streams.
    ``map_size`` is the trunk's output grid at the configured input size; ``fc_dim`` the width
    of x_A and x_B. ``embedding``: ``"fc"`` (the paper's FC on the flattened map) or
    ``"bnneck"`` (:class:`~model.embedding.BNNeckEmbedding`, x_A and x_B of width C, or
    (1 + ``stripes``) x C with horizontal stripes; ``fc_dim`` is then unused). Either sits in
    ``self.fc``.
    """

    def __init__(self, trunk_a: nn.Module, fusion: Fusion, pooling: SpatialPooling,
                 map_size: tuple[int, int], fc_dim: int = 512,
                 trunk_b: nn.Module | None = None, embedding: str = "fc",
                 stripes: int = 0) -> None:
        super().__init__()
        self.trunks = nn.ModuleList([trunk_a] if trunk_b is None else [trunk_a, trunk_b])
        channels = trunk_a.out_channels
        if trunk_b is not None and trunk_b.out_channels != channels:
            raise ValueError("the two trunks must give the same number of channels")
        if fusion.out_channels != channels:
            raise ValueError(f"fusion gives {fusion.out_channels} channels, trunk {channels}")
        self.fusion = fusion
        self.pooling = pooling
        self.map_size = tuple(map_size)
        if embedding not in ("fc", "bnneck"):
            raise ValueError(f"embedding must be 'fc' or 'bnneck', not {embedding!r}")
        if stripes and (embedding != "bnneck" or self.map_size[0] % stripes):
            raise ValueError(f"stripes={stripes} needs the bnneck embedding and a map height "
                             f"that is a multiple of it (map {self.map_size})")
        self.fc = (BNNeckEmbedding(channels, stripes) if embedding == "bnneck" else
                   nn.Linear(channels * self.map_size[0] * self.map_size[1], fc_dim))
        self.channels = channels
        # The tail (pooling's out_proj, then the FC) is fused into one matrix for inference
        # only where that at least halves the work per pair: for wide hidden layers the fused
        # matrix is huge, and it is stored beside the FC's. In training it is recomposed at
        # every step and never stored, so there it is fused whenever it saves work.
        cells = self.map_size[0] * self.map_size[1]
        if pooling.out_proj is None:
            self._fuse_tail = self._fuse_tail_training = False
        else:
            c = pooling.core_channels
            fused = fc_dim * c * cells
            unfused = c * channels * cells + channels * cells * fc_dim
            self._fuse_tail = 2 * fused <= unfused
            self._fuse_tail_training = fused <= unfused

    @property
    def bnneck(self) -> bool:
        return isinstance(self.fc, BNNeckEmbedding)

    def embed(self, maps: torch.Tensor) -> torch.Tensor:
        """conv5 maps ``(B, C, K1, K2)`` -> per-image embeddings ``(B, D)`` (F~ = 0)."""
        if self.bnneck:
            return self.fc(maps)
        return self.fc(self._to_grid(maps).flatten(1))

    def _prepare(self, maps: torch.Tensor, embed) -> StreamFeatures:
        return StreamFeatures(embed(maps), self.embed(maps))

    def prepare_probe(self, maps: torch.Tensor) -> StreamFeatures:
        """conv5 maps ``(B, C, K1, K2)`` -> the stream-A side of a pair."""
        return self._prepare(maps, self.fusion.embed_a)

    def prepare_gallery(self, maps: torch.Tensor) -> StreamFeatures:
        """conv5 maps ``(B, C, K1, K2)`` -> the stream-B side of a pair (cacheable)."""
        return self._prepare(maps, self.fusion.embed_b)

    def head_weights(self) -> HeadWeights:
        entry = compose_pointwise(self.fusion.projection, self.pooling.in_proj)
        if self.bnneck:
            # W F~ = scale * out_proj(each region's mean of the core output).
            scale, out = self.fc.scale(), self.pooling.out_proj
            tail = ((out.weight.flatten(1), out.bias) if out is not None else
                    (torch.eye(self.channels, dtype=scale.dtype, device=scale.device),
                     scale.new_zeros(self.channels)))
            return HeadWeights(entry, tail, True, scale)
        fc_w = self.fc.weight
        out = self.pooling.out_proj
        if out is None or not (self._fuse_tail_training if self.training else self._fuse_tail):
            # A zero bias, not None: a linear map with a bias exports to ONNX as one Gemm on
            # the FC's own weight, which the probe and gallery graphs hold too (stored once);
            # without one the exporter would store a transposed copy (205 MB for `dsmi`).
            return HeadWeights(entry, (fc_w, fc_w.new_zeros(fc_w.shape[0])), False)
        k = self.map_size[0] * self.map_size[1]
        w = fc_w.view(fc_w.shape[0], self.channels, k)
        out_w = out.weight.flatten(1)
        # Columns in (cell, core channel) order: the per-pair path is channels last.
        tail_w = torch.einsum("fck,cj->fkj", w, out_w).reshape(fc_w.shape[0], -1)
        tail_b = w.sum(-1) @ out.bias
        return HeadWeights(entry, (tail_w, tail_b), True)

    def score_features(self, probe: StreamFeatures, gallery: StreamFeatures,
                       head_weights: HeadWeights | None = None) -> torch.Tensor:
        hw = head_weights or self.head_weights()
        joint = self.fusion.combine(probe.joint, gallery.joint)  # (P, j, H, W)
        p, _, h, w = joint.shape
        # Channels last from here on: the linear maps are products on the innermost axis, and
        # this batched 2D transpose is the one layout change of the joint map.
        x = joint.flatten(2).transpose(1, 2)  # (P, H*W, j)
        if hw.entry is not None:
            x = F.linear(x, *hw.entry)
        x = self.pooling.core_last(x.reshape(p, h, w, x.shape[-1]))  # (P, H, W, c)
        if hw.tail_scale is not None:  # a BNNeck embedding
            regions = self.fc.region_means(x.permute(0, 3, 1, 2))  # (P, R, c)
            joint = F.linear(regions, *hw.tail).flatten(1) * hw.tail_scale
            return F.cosine_similarity(probe.embedding - joint, gallery.embedding - joint, dim=1)
        if (h, w) != tuple(self.map_size):
            x = self._to_grid(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        tail_w, tail_b = hw.tail
        if not hw.tail_fused:
            if self.pooling.out_proj is not None:
                x = F.linear(x, self.pooling.out_proj.weight.flatten(1),
                             self.pooling.out_proj.bias)
            x = x.permute(0, 3, 1, 2)  # the FC's (C, H, W) order
        # W F~ without the FC's bias: the bias is in both per-image embeddings already.
        joint = F.linear(x.flatten(1), tail_w, tail_b)
        return F.cosine_similarity(probe.embedding - joint, gallery.embedding - joint, dim=1)

    def pair_representations(self, maps_a: torch.Tensor, maps_b: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's equations step by step, nothing fused: aligned conv5 maps
        ``(P, C, K1, K2)`` x2 -> x_A, x_B ``(P, fc_dim)``. For checks and explanation."""
        joint = self.pooling(self.fusion(maps_a, maps_b))
        return self.embed(maps_a - joint), self.embed(maps_b - joint)


class FCCNN(MatchingNetwork):
    """FC-CNN baseline: trunk, FC on the flattened conv5 map (the embedding), identity softmax.

    The FC output is the penultimate layer, so it is the embedding; ``score`` is the cosine of
    two embeddings. ``logits`` feeds the identity classifier used for training.
    """

    def __init__(self, trunk: nn.Module, map_size: tuple[int, int], fc_dim: int = 512,
                 num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.trunks = nn.ModuleList([trunk])
        self.map_size = tuple(map_size)
        self.fc = nn.Linear(trunk.out_channels * self.map_size[0] * self.map_size[1], fc_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(fc_dim, num_classes)

    def embed(self, maps: torch.Tensor) -> torch.Tensor:
        """conv5 maps ``(B, C, K1, K2)`` -> embeddings ``(B, fc_dim)``."""
        return self.fc(self._to_grid(maps).flatten(1))

    def prepare_probe(self, maps: torch.Tensor) -> EmbeddingFeatures:
        return EmbeddingFeatures(self.embed(maps))

    prepare_gallery = prepare_probe

    def score_features(self, probe: EmbeddingFeatures, gallery: EmbeddingFeatures,
                       head_weights: object = None) -> torch.Tensor:
        return F.cosine_similarity(probe.embedding, gallery.embedding, dim=1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> identity logits ``(B, num_classes)``."""
        return self.classifier(self.dropout(torch.relu(self.embed(self.encode(images)))))

    def similarity_matrix(self, images: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(self.embed(self.encode(images)), dim=1)
        return emb @ emb.T
