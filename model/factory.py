"""Named variants of the paper's network and its baselines, built from one spec each."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .fusion import BilinearFusion, HadamardFusion, MultiplicativeGate
from .network import FCCNN, MatchingNetwork, TwoStreamMatchingNetwork
from .pooling import GlobalAveragePooling, SpatialPyramidPooling, StackedConv, StackedIRNN
from .trunks import EfficientNetLiteTrunk, SmallTrunk, VGG16Trunk, VGGMTrunk
from .weights import load_trunk_weights

__all__ = ["VariantSpec", "VARIANTS", "build_model", "list_variants", "variant_spec"]


@dataclass(frozen=True)
class VariantSpec:
    """Everything that tells one variant from another. Every field can be overridden.

    trunk / trunk_b: ``vgg16``, ``vggm``, ``small-vggd``, ``small-vggm``, ``lite0``
    (EfficientNet-Lite0 to stride 16), ``lite0-head``, ``lite1-head``, ``lite2-head`` (all of
    EfficientNet-LiteN to its 1280-channel head conv, stride 32); ``trunk_b=None``: the
    streams share one trunk.
    trunk_frozen: leading trunk stages kept fixed in training (``lite*`` only).
    embedding: ``fc`` (the paper's FC on the flattened map) or ``bnneck`` (global average and
    batch norm, width C; ``fc_dim`` unused). stripes: horizontal bands whose means the BNNeck
    keeps beside the global mean (part features; width (1 + stripes) x C).
    fusion: ``gate`` (Eq. 2), ``gate-linear`` (Eq. 1), ``hadamard`` (MI), ``bilinear`` (B-CNN).
    pooling: ``irnn``, ``spp``, ``gap``, ``conv``, or ``none`` with ``head="fc-cnn"``.
    embed_dim: d (or the bilinear rank); hidden: IRNN / conv width; fc_dim: width of x_A, x_B
    (or of FC-CNN's embedding); input_size: (H, W).
    """

    trunk: str = "vgg16"
    trunk_b: str | None = None
    fusion: str = "gate"
    pooling: str = "irnn"
    head: str = "pair"
    embed_dim: int = 512
    hidden: int = 512
    fc_dim: int = 512
    irnn_layers: int = 2
    dropout: float = 0.5
    input_size: tuple[int, int] = (224, 224)
    num_classes: int = 1000
    weights: str | None = None      # None (random), "imagenet", or a path; for trunk A
    weights_b: str | None = None    # the same for trunk B when the streams do not share
    trunk_frozen: int = 0
    embedding: str = "fc"
    stripes: int = 0


_SMALL = dict(embed_dim=64, hidden=32, fc_dim=128, input_size=(128, 64))

_BASE: dict[str, VariantSpec] = {
    "dsmi": VariantSpec(),
    "dsmi-vggm": VariantSpec(trunk="vggm"),
    "dsmi-vggd-vggm": VariantSpec(trunk="vgg16", trunk_b="vggm"),
    "mi-spp": VariantSpec(fusion="hadamard", pooling="spp"),
    "bcnn-spp": VariantSpec(fusion="bilinear", pooling="spp", embed_dim=64),
    "bcnn-irnn": VariantSpec(fusion="bilinear", pooling="irnn", embed_dim=64),
    "dsmi-gap": VariantSpec(pooling="gap"),
    "dsmi-conv": VariantSpec(pooling="conv"),
    "fc-cnn": VariantSpec(fusion="none", pooling="none", head="fc-cnn"),
}

_SMALL_TRUNK = {"vgg16": "small-vggd", "vggm": "small-vggm"}


def _small(spec: VariantSpec) -> VariantSpec:
    narrow = dict(_SMALL)
    if spec.fusion == "bilinear":
        narrow["embed_dim"] = 16  # rank 16: 256 outer-product channels
    return dataclasses.replace(
        spec, trunk=_SMALL_TRUNK[spec.trunk],
        trunk_b=_SMALL_TRUNK[spec.trunk_b] if spec.trunk_b else None, **narrow)


# The ImageNet EfficientNet-Lite0 trunk (stride 16, 112 channels) at 192x96: a 12x6 grid.
# Input size and head widths are set by the cost of training all pairs of 128-image batches
# on a CPU (docs/model.md). The stem and blocks 0-2 (stride <= 8) stay at ImageNet's.
_LITE0 = dict(trunk="lite0", embed_dim=64, hidden=32, fc_dim=256, input_size=(192, 96),
              weights="imagenet", trunk_frozen=4)
_LITE0_BASES = ("dsmi", "mi-spp", "bcnn-spp", "bcnn-irnn", "dsmi-gap", "dsmi-conv", "fc-cnn")


def _lite0(spec: VariantSpec) -> VariantSpec:
    narrow = dict(_LITE0)
    if spec.fusion == "bilinear":
        narrow["embed_dim"] = 16
    return dataclasses.replace(spec, **narrow)


# The whole ImageNet EfficientNet-Lite0 (1280-channel head conv, stride 32) at 256x128, an 8x4
# grid, with a BNNeck embedding: the trunk and embedding train first as a re-id embedding
# (identity and triplet losses), then the gate/IRNN head on pairs (docs/results.md). The stem
# and block 0 (stride 2, the costliest backward on a CPU) stay at ImageNet's.
_LITE0_BNNECK = dict(trunk="lite0-head", embedding="bnneck", embed_dim=64, hidden=32,
                     fc_dim=1280, input_size=(256, 128), weights="imagenet", trunk_frozen=2)
_LITE0_BNNECK_BASES = ("dsmi", "mi-spp", "bcnn-irnn", "dsmi-gap")


def _lite0_bnneck(spec: VariantSpec) -> VariantSpec:
    narrow = dict(_LITE0_BNNECK)
    if spec.fusion == "bilinear":
        narrow["embed_dim"] = 16
    return dataclasses.replace(spec, **narrow)


# The same with the larger ImageNet EfficientNet-Lite2 (ImageNet top-1 77.6 against Lite0's
# 75.1, about twice the training step on a CPU at 256x128); the stem and blocks 0-1 stay fixed.
_LITE2_BNNECK_BASES = ("dsmi",)


def _lite2_bnneck(spec: VariantSpec) -> VariantSpec:
    return dataclasses.replace(_lite0_bnneck(spec), trunk="lite2-head", trunk_frozen=3)


# The Lite0 BNNeck network with part features: the global mean and the means of the map's top
# and bottom halves (4 x 4 cells each), each with its own identity classifier in phase 1.
_LITE0_STRIPES_BASES = ("dsmi",)


def _lite0_stripes(spec: VariantSpec) -> VariantSpec:
    return dataclasses.replace(_lite0_bnneck(spec), stripes=2)


VARIANTS: dict[str, VariantSpec] = {
    **_BASE, **{f"{name}-small": _small(spec) for name, spec in _BASE.items()},
    **{f"{name}-lite0": _lite0(_BASE[name]) for name in _LITE0_BASES},
    **{f"{name}-lite0-bnneck": _lite0_bnneck(_BASE[name]) for name in _LITE0_BNNECK_BASES},
    **{f"{name}-lite2-bnneck": _lite2_bnneck(_BASE[name]) for name in _LITE2_BNNECK_BASES},
    **{f"{name}-lite0-stripes": _lite0_stripes(_BASE[name]) for name in _LITE0_STRIPES_BASES}}


def list_variants() -> list[str]:
    return list(VARIANTS)


def variant_spec(name: str, **overrides) -> VariantSpec:
    """The spec of a named variant with ``overrides`` applied (unknown fields are errors)."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(VariantSpec)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; fields: {sorted(fields)}")
    if "input_size" in overrides:
        overrides["input_size"] = tuple(int(v) for v in overrides["input_size"])
    return dataclasses.replace(VARIANTS[name], **overrides)


def _build_trunk(kind: str, weights: str | Path | None, frozen: int = 0) -> nn.Module:
    builders = {"vgg16": VGG16Trunk, "vggm": VGGMTrunk,
                "small-vggd": lambda: SmallTrunk(style="vggd"),
                "small-vggm": lambda: SmallTrunk(style="vggm"),
                "lite0": lambda: EfficientNetLiteTrunk(frozen_stages=frozen),
                **{f"lite{n}-head": (lambda n=n: EfficientNetLiteTrunk(
                    f"efficientnet_lite{n}", frozen_stages=frozen, cut="head"))
                   for n in (0, 1, 2)}}
    if kind not in builders:
        raise ValueError(f"unknown trunk {kind!r}; known: {', '.join(builders)}")
    if frozen and not kind.startswith("lite"):
        raise ValueError(f"trunk_frozen is for the lite trunks, not {kind!r}")
    trunk = builders[kind]()
    if weights is not None:
        load_trunk_weights(trunk, weights)
    return trunk


def _build_fusion(spec: VariantSpec, channels: int) -> nn.Module:
    if spec.fusion in ("gate", "gate-linear"):
        return MultiplicativeGate(channels, spec.embed_dim, sigmoid=spec.fusion == "gate")
    if spec.fusion == "hadamard":
        return HadamardFusion(channels)
    if spec.fusion == "bilinear":
        return BilinearFusion(channels, rank=spec.embed_dim)
    raise ValueError(f"unknown fusion {spec.fusion!r}")


def _build_pooling(spec: VariantSpec, channels: int) -> nn.Module:
    if spec.pooling == "irnn":
        return StackedIRNN(channels, spec.hidden, spec.irnn_layers, spec.dropout)
    if spec.pooling == "spp":
        return SpatialPyramidPooling(channels)
    if spec.pooling == "gap":
        return GlobalAveragePooling(channels)
    if spec.pooling == "conv":
        return StackedConv(channels, spec.hidden)
    raise ValueError(f"unknown pooling {spec.pooling!r}")


def build_model(name: str = "dsmi", **overrides) -> MatchingNetwork:
    """Build the named variant (see ``VARIANTS``), with any ``VariantSpec`` field overridden.

    ``weights="imagenet"`` loads ImageNet weights from this machine (torchvision's VGG-16 from
    the local cache; EfficientNet-Lite0 from its package): a clear error if they are not
    there, nothing is downloaded. A path loads a state dict; ``None`` leaves the trunk random.
    """
    spec = variant_spec(name, **overrides)
    h, w = spec.input_size
    trunk_a = _build_trunk(spec.trunk, spec.weights, spec.trunk_frozen)
    stride = trunk_a.stride
    if h % stride or w % stride:
        raise ValueError(f"input_size {spec.input_size} must be a multiple of {stride}")
    map_size = (h // stride, w // stride)
    if spec.embedding not in ("fc", "bnneck"):
        raise ValueError(f"unknown embedding {spec.embedding!r}; known: fc, bnneck")
    if spec.head == "fc-cnn":
        net: MatchingNetwork = FCCNN(trunk_a, map_size, spec.fc_dim, spec.num_classes,
                                     spec.dropout)
    else:
        trunk_b = (_build_trunk(spec.trunk_b, spec.weights_b, spec.trunk_frozen)
                   if spec.trunk_b else None)
        channels = trunk_a.out_channels
        net = TwoStreamMatchingNetwork(trunk_a, _build_fusion(spec, channels),
                                       _build_pooling(spec, channels), map_size, spec.fc_dim,
                                       trunk_b=trunk_b, embedding=spec.embedding,
                                       stripes=spec.stripes)
    net.variant = name
    net.input_size = spec.input_size
    net.build_args = {"name": name, **overrides}
    net.spec = spec
    return net
