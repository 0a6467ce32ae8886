"""Checkpoints: a model's variant, build arguments and weights in one file (torch.save).

Layout: ``{"format": 1, "variant": str, "build_args": dict, "state_dict": dict, **extra}``;
training adds ``epoch``, ``optimizer``, ``history`` and the like as extra keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .factory import build_model
from .network import MatchingNetwork

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, net: MatchingNetwork, **extra) -> Path:
    """Write atomically (temp file, then rename): an interrupted save never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "variant": net.variant,
               "build_args": dict(net.build_args), "state_dict": net.state_dict(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """The payload of a checkpoint file, checked to be one of ours (no network is built)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dsmi checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def load_checkpoint(path: str | Path, map_location: str = "cpu"
                    ) -> tuple[MatchingNetwork, dict]:
    """Rebuild the network a checkpoint describes and load its weights -> ``(net, payload)``."""
    payload = read_checkpoint(path, map_location)
    args = dict(payload["build_args"])
    name = args.pop("name", payload["variant"])
    # Pretrained weights were only the starting point; the checkpoint holds the trained ones
    # (None, not absent: some variants default to ImageNet weights).
    args.update(weights=None, weights_b=None)
    net = build_model(name, **args)
    net.load_state_dict(payload["state_dict"])
    return net, payload
