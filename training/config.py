"""Training configuration: YAML files under ``configs/`` plus command-line overrides.

``load_config("configs/cpu.yaml", ["train.lr=0.01", "model.variant=fc-cnn-small"])``: each
override is ``dotted.key=value`` with the value parsed as YAML (numbers, lists, null...).
Unknown keys are errors, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.registry import DATASETS

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "Config", "load_config",
           "default_data_root", "ConfigError", "CHOICES", "validate_config"]


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
    trunk_lr_mult: float = 1.0         # the trunk's learning rate is lr x this (pretrained: < 1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"           # lr -> lr/100 over the epochs or the budget, or "constant"
    alpha: float = 2.0
    beta: float = 0.5
    flip: bool = True
    shift: tuple[int, int] = (5, 10)   # pixels: left/right, then up/down (paper at 224x224)
    patience: int = 5                  # epochs without a better validation mAP before stopping
    pretrain_epochs: int = 0           # phase 1: the trunk and embedding as an identity
                                       # classifier (FC-CNN softmax; with a BNNeck embedding,
                                       # label-smoothed softmax + batch-hard triplet, P x K)
    pretrain_lr: float | None = None   # phase 1's learning rate (None: lr)
    pretrain_batch_size: int | None = None  # phase 1's batch (None: batch_size)
    pretrain_minutes: float | None = None  # phase 1's own budget; phase 2 starts after it
    warmup_epochs: int = 0             # linear warm-up at the start of each phase
    label_smoothing: float = 0.0       # of the phase-1 identity softmax
    triplet_margin: float = 0.3        # batch-hard triplet of a BNNeck phase 1
    erasing: float = 0.0               # random erasing: probability per image (phase 1)
    channels_last: bool = False        # the trunk in channels-last memory (faster on CPUs)
    map_cache: str | None = None       # a folder keeping phase 2's cached maps across runs
    init_from: str | None = None       # a dsmi checkpoint to start from (its tensors whose names
                                       # and shapes match), e.g. a CUHK03 model for VIPeR
    init_from_parts: str = "all"       # "all" of it, or the trunk and "embedding" only
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


# Fields that take one of a few words; checked when the config loads, so that a misspelt
# sampler fails at once and not after an hour of training.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.protocol": tuple(DATASETS),
    "train.sampler": ("random", "pk"),
    "train.init_from_parts": ("all", "embedding"),
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.schedule": ("cosine", "constant"),
    "train.precision": ("fp32", "bf16"),
}
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """``value`` as the field's type (an int where a float is wanted; YAML reads ``1e-3``
    as a string, which is accepted as a number too), or a ConfigError naming the field."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = typing.get_args(annotation) if union else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if kind is str and isinstance(value, str):
            return value
        if typing.get_origin(kind) is dict and isinstance(value, dict):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{where} must be {names}, not {value!r}")


def validate_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` for a value no run could use (see ``CHOICES``)."""
    for dotted, options in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{dotted} is {value!r}; allowed: {', '.join(options)}")
    t, d = cfg.train, cfg.data
    if not _DEVICE.fullmatch(str(t.device)):
        raise ConfigError(f"train.device is {t.device!r}; allowed: cpu, cuda, cuda:N")
    positive = {"train.batch_size": t.batch_size, "train.instances_per_id": t.instances_per_id,
                "train.lr": t.lr, "train.trunk_lr_mult": t.trunk_lr_mult,
                "train.patience": t.patience,
                "train.eval_every": t.eval_every}
    if t.max_minutes is not None:
        positive["train.max_minutes"] = t.max_minutes
    if t.threads is not None:
        positive["train.threads"] = t.threads
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, not {value}")
    if not 0.0 <= t.erasing <= 1.0 or not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError("train.erasing must be in [0, 1] and train.label_smoothing in [0, 1)")
    for key, value in (("train.pretrain_lr", t.pretrain_lr),
                       ("train.pretrain_minutes", t.pretrain_minutes)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be positive, not {value}")
    if t.pretrain_batch_size is not None and (
            t.pretrain_batch_size <= 0 or t.pretrain_batch_size % t.instances_per_id):
        raise ConfigError(f"train.pretrain_batch_size must be a positive multiple of "
                          f"train.instances_per_id, not {t.pretrain_batch_size}")
    for key, value in {"train.epochs": t.epochs, "train.pretrain_epochs": t.pretrain_epochs,
                       "train.warmup_epochs": t.warmup_epochs,
                       "train.triplet_margin": t.triplet_margin,
                       "train.weight_decay": t.weight_decay, "data.val_ids": d.val_ids,
                       "data.num_workers": d.num_workers}.items():
        if value < 0:
            raise ConfigError(f"{key} must not be negative, not {value}")
    if len(t.shift) != 2 or min(t.shift) < 0:
        raise ConfigError(f"train.shift must be two pixel counts >= 0, not {list(t.shift)}")
    if t.sampler == "pk" and t.batch_size % t.instances_per_id:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                          f"train.instances_per_id ({t.instances_per_id}) for the pk sampler")
    try:
        from model.factory import variant_spec

        variant_spec(cfg.model.variant, **cfg.model.overrides)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc.args[0] if exc.args else exc}") from None


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
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{where}.shift must be two integers, not {value!r}")
            value = tuple(value)
        else:
            value = _check_type(f"{where}.{name}", value, typing.get_type_hints(cls)[name])
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
    cfg = _build(Config, tree, str(path or "config"))
    validate_config(cfg)
    return cfg


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
