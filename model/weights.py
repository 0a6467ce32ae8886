"""Loading pretrained trunk weights. The only file I/O in :mod:`model`; it never downloads.

``"imagenet"`` means torchvision's VGG-16 ImageNet weights, read from the local torch hub cache
(``$TORCH_HOME/hub/checkpoints``). A path names a state dict on disk: torchvision's full VGG
state dict (``features.*`` keys, the classifier is ignored) or a trunk's own state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightsNotFoundError", "imagenet_weights_path", "load_trunk_weights"]


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine."""


def imagenet_weights_path(family: str) -> Path:
    """Where torchvision keeps the ImageNet weights of a trunk family in the local cache."""
    if family != "vgg16":
        raise WeightsNotFoundError(
            f"torchvision has no ImageNet weights for a {family!r} trunk; "
            "pass the path of a state dict instead")
    from torchvision.models import VGG16_Weights

    filename = Path(VGG16_Weights.IMAGENET1K_V1.url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_trunk_weights(trunk: nn.Module, source: str | Path) -> nn.Module:
    """Load ``source`` ("imagenet" or a path) into ``trunk`` in place and return it."""
    if str(source) == "imagenet":
        path = imagenet_weights_path(getattr(trunk, "family", type(trunk).__name__))
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
