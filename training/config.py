"""Training configuration: YAML files under ``configs/`` plus command-line overrides.

``load_config("configs/cpu.yaml", ["train.lr=0.01", "model.variant=fc-cnn-small"])``: each
override is ``dotted.key=value`` with the value parsed as YAML (numbers, lists, null...).
Unknown keys are errors, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "Config", "load_config",
           "default_data_root", "ConfigError"]


class ConfigError(ValueError):
    """A config file or override is malformed; the message says which key."""


def default_data_root() -> Path:
    """``$DSMI_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("DSMI_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class ModelConfig:
    variant: str = "dsmi-small"
    overrides: dict[str, Any] = field(default_factory=dict)  # any model.VariantSpec field


@dataclass
class DataConfig:
    """Where the images are and which protocol splits them.

    protocol: ``manifest`` (a ``path,pid,camid,split`` CSV: ``train_split`` for training,
    ``test_split`` for testing), ``viper`` (the manifest or the official layout: a seeded
    316/316 split of the identities), ``cuhk03`` (official ``cuhk-03.mat``: 1160/100/100),
    ``market1501`` (official folders). ``root`` defaults to ``$DSMI_DATA`` or ../shared/data.
    """

    protocol: str = "manifest"
    root: str | None = None
    manifest: str | None = "cuhk03-labeled.csv"
    train_split: str = "train"
    test_split: str = "val"
    split_seed: int = 0
    val_ids: int = 50               # identities carved from training for early stopping
    cache_images: bool = True       # keep decoded, resized images in memory
    num_workers: int = 0

    def root_path(self) -> Path:
        return Path(os.path.expandvars(self.root)).expanduser() if self.root \
            else default_data_root()


@dataclass
class TrainConfig:
    epochs: int = 30
    max_minutes: float | None = None   # wall-clock budget; stops after the batch that ends it
    batch_size: int = 128
    sampler: str = "random"            # "random": 128 images from all cameras; "pk": P ids x K
    instances_per_id: int = 4          # K of the "pk" sampler
    optimizer: str = "adam"            # "adam", "adamw" (decoupled weight decay) or "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"           # lr -> lr/100 over the epochs or the budget, or "constant"
    alpha: float = 2.0
    beta: float = 0.5
    flip: bool = True
    shift: tuple[int, int] = (5, 10)   # pixels: left/right, then up/down (paper at 224x224)
    patience: int = 5                  # epochs without a better validation mAP before stopping
    pretrain_epochs: int = 0           # phase 1: FC-CNN identity-softmax fine-tuning of the trunk
    init_from: str | None = None       # a dsmi checkpoint to start from (its tensors whose names
                                       # and shapes match), e.g. a CUHK03 model for VIPeR
    eval_every: int = 1
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"            # "fp32" or "bf16" (autocast for the forward pass)
    threads: int | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; "
                          f"known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}.get(name)
        if cls is Config and sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name} must be a mapping")
            value = _build(sub, value, f"{where}.{name}")
        elif name == "shift":
            value = tuple(int(v) for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a mapping")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return _build(Config, tree, str(path or "config"))


def describe_fields() -> str:
    """Every config field as ``section.name=default``, comma-separated, for ``--help``."""
    return ", ".join(f"{section}.{f.name}={_default_text(f)}"
                     for section, cls in (("model", ModelConfig), ("data", DataConfig),
                                          ("train", TrainConfig))
                     for f in dataclasses.fields(cls))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return str(f.default)
    return str(f.default_factory())  # type: ignore[misc]
