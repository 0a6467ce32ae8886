"""The datasets, one entry each: how its images are read and how they are split, for training
(:func:`training.protocols.prepare_data`), for a test set (``dsmi evaluate``,
:func:`training.evaluate.load_eval_data`) and for the config checks (``data.protocol``).

- ``manifest``: a ``path,pid,camid,split`` CSV; ``train_split`` trains, ``test_split`` tests
  (the shared CUHK03 copy: ``train`` / ``val``).
- ``viper``: VIPeR (a manifest, or the official layout): a seeded random 316/316 split of the
  identities, camera A probes against camera B.
- ``cuhk03``: the official ``cuhk-03.mat`` (labeled or detected boxes): random 1160/100/100
  identities (it has its own 100 validation identities), one of the 20 official test sets, or
  the 767/700 protocol.
- ``market1501``: the official folders; query and gallery as released (distractors kept).

Two-camera test sets are camera-1 queries against camera-2 gallery images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .manifest import read_manifest
from .records import ImageRecord, by_split
from .splits import cuhk03_official_split, cuhk03_split, query_gallery, viper_split

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["TrainingParts", "EvalData", "EvalOptions", "Dataset", "DATASETS", "dataset",
           "evaluation_sets"]


@dataclass
class TrainingParts:
    """What a dataset's protocol gives training; ``val=None``: carve validation identities
    from ``train`` (``data.val_ids``)."""

    train: list[ImageRecord]
    val: list[ImageRecord] | None
    test_queries: list[ImageRecord]
    test_gallery: list[ImageRecord]
    keep_pids: tuple[int, ...] = ()  # gallery pids kept whole in single-shot (distractors)


@dataclass
class EvalData:
    """Queries and gallery of one test set, and how they were obtained."""

    queries: list[ImageRecord]
    gallery: list[ImageRecord]
    dataset: str
    split: str
    protocol: str                      # how queries/gallery were formed, in words
    keep_pids: tuple[int, ...] = ()    # gallery pids kept whole in single-shot draws
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvalOptions:
    """``dsmi evaluate``'s choices of a test set."""

    split: str | None = None
    split_seed: int = 0
    cuhk03_boxes: str = "labeled"
    cuhk03_protocol: str = "random"
    cuhk03_testset: int = 1
    progress: bool = False


@dataclass(frozen=True)
class Dataset:
    name: str
    training: Callable[[DataConfig], TrainingParts]
    test_set: Callable[[Path, EvalOptions], EvalData]


def evaluation_sets(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Queries and gallery for a set of evaluation identities: camera 1 against camera 2 on
    two-camera data, else every image against every other (the metric leaves out the
    same-person, same-camera images)."""
    if len({r.camid for r in records}) == 2:
        cams = sorted({r.camid for r in records})
        return query_gallery(records, cams[0], cams[1])
    return list(records), list(records)


def _two_camera(records, name, split, protocol, **details) -> EvalData:
    queries, gallery = query_gallery(records)
    return EvalData(queries, gallery, name, split,
                    protocol + "; camera-1 queries vs camera-2 gallery", details=details)


def _with_split(records: list[ImageRecord], split: str, where: object) -> list[ImageRecord]:
    chosen = by_split(records, split)
    if not chosen:
        splits = sorted({r.split for r in records})
        hint = " (a VIPeR manifest? add --dataset viper)" if splits == ["all"] else ""
        raise ValueError(f"{where} has no split {split!r}; it has {splits}{hint}")
    return chosen


# -- manifest ---------------------------------------------------------------------------------

def _manifest_training(cfg: DataConfig) -> TrainingParts:
    if not cfg.manifest:
        raise ValueError("data.protocol 'manifest' needs data.manifest")
    path = cfg.root_path() / cfg.manifest
    records = read_manifest(path)
    train = _with_split(records, cfg.train_split, path)
    test = _with_split(records, cfg.test_split, path)
    return TrainingParts(train, None, *evaluation_sets(test))


def _manifest_test(path: Path, options: EvalOptions) -> EvalData:
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        raise ValueError(f"{path} is not a manifest CSV: name the official layout with "
                         f"--dataset viper|cuhk03|market1501")
    split = options.split or "val"
    return _two_camera(_with_split(read_manifest(path), split, path), "manifest", split,
                       f"manifest {path.name}, split {split}")


# -- VIPeR ------------------------------------------------------------------------------------

def _viper_records(path: Path) -> list[ImageRecord]:
    if path.is_file():
        return read_manifest(path)
    from .viper import read_viper
    return read_viper(path)


def _viper_training(cfg: DataConfig) -> TrainingParts:
    root = cfg.root_path()
    records = _viper_records(root / cfg.manifest if cfg.manifest else root)
    train, test = viper_split(records, cfg.split_seed)
    return TrainingParts(train, None, *evaluation_sets(test))


def _viper_test(path: Path, options: EvalOptions) -> EvalData:
    records = _viper_records(path)
    if options.split == "all":  # every person: transfer without training on VIPeR
        return _two_camera(records, "viper", "all", "VIPeR, all 632 people")
    _, test = viper_split(records, options.split_seed)
    kind = "manifest" if path.is_file() else "official layout"
    return _two_camera(test, "viper", "test", f"VIPeR {kind}, random 316/316 split (seed "
                       f"{options.split_seed}), test half", split_seed=options.split_seed)


# -- CUHK03 -----------------------------------------------------------------------------------

def _cuhk03_training(cfg: DataConfig) -> TrainingParts:
    from .cuhk03 import read_cuhk03

    train, val, test = cuhk03_split(read_cuhk03(cfg.root_path()), cfg.split_seed)
    return TrainingParts(train, val, *evaluation_sets(test))


def _cuhk03_test(path: Path, options: EvalOptions) -> EvalData:
    from . import cuhk03 as cuhk03_data

    name, boxes = f"cuhk03-{options.cuhk03_boxes}", options.cuhk03_boxes
    if options.cuhk03_protocol == "new":
        records = cuhk03_data.read_cuhk03_new_protocol(path, boxes, progress=options.progress)
        return EvalData(by_split(records, "query"), by_split(records, "gallery"), name,
                        "query/gallery", "CUHK03 767/700 protocol, official query and gallery")
    records = cuhk03_data.read_cuhk03(path, boxes, progress=options.progress)
    if options.cuhk03_protocol == "official":
        testset = options.cuhk03_testset
        _, test = cuhk03_official_split(records, cuhk03_data.cuhk03_testsets(path), testset)
        return _two_camera(test, name, f"testset-{testset}",
                           f"CUHK03 official test set {testset} of 20", testset=testset)
    if options.cuhk03_protocol != "random":
        raise ValueError(f"unknown CUHK03 protocol {options.cuhk03_protocol!r}; "
                         "known: random, official, new")
    split = options.split or "test"
    train, val, test = cuhk03_split(records, options.split_seed)
    parts = {"train": train, "val": val, "test": test}
    if split not in parts:
        raise ValueError(f"CUHK03 random split has no part {split!r}; use val or test")
    return _two_camera(parts[split], name, split, f"CUHK03, random 1160/100/100 split "
                       f"(seed {options.split_seed}), {split} part",
                       split_seed=options.split_seed)


# -- Market-1501 ------------------------------------------------------------------------------

def _market_training(cfg: DataConfig) -> TrainingParts:
    from .market1501 import read_market1501

    records = read_market1501(cfg.root_path())
    return TrainingParts(by_split(records, "train"), None, by_split(records, "query"),
                         by_split(records, "gallery"), keep_pids=(0,))


def _market_test(path: Path, options: EvalOptions) -> EvalData:
    from .market1501 import read_market1501

    records = read_market1501(path, splits=("query", "gallery"))
    return EvalData(by_split(records, "query"), by_split(records, "gallery"), "market1501",
                    "query/gallery", "Market-1501 official query and gallery (junk dropped, "
                    "distractors kept)", keep_pids=(0,))


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("manifest", _manifest_training, _manifest_test),
    Dataset("viper", _viper_training, _viper_test),
    Dataset("cuhk03", _cuhk03_training, _cuhk03_test),
    Dataset("market1501", _market_training, _market_test),
)}


def dataset(name: str) -> Dataset:
    """The registry entry of ``name``, or a ValueError listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]
