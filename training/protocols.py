"""From a data config to the records each stage uses: train, validation, test query/gallery.

Each dataset's protocol (Section 4 of the paper) is its entry in :mod:`training.data.registry`.
Validation (early stopping) holds out ``val_ids`` training identities, except where the
protocol has its own (CUHK03's 100 validation identities).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import DataConfig
from .data.records import ImageRecord
from .data.registry import dataset, evaluation_sets
from .data.splits import carve_validation

__all__ = ["DataSplits", "prepare_data", "evaluation_sets"]


@dataclass
class DataSplits:
    train: list[ImageRecord]
    val_queries: list[ImageRecord]
    val_gallery: list[ImageRecord]
    test_queries: list[ImageRecord]
    test_gallery: list[ImageRecord]
    protocol: str
    keep_pids: tuple[int, ...] = ()      # gallery pids kept whole in single-shot (distractors)
    info: dict = field(default_factory=dict)


def prepare_data(cfg: DataConfig) -> DataSplits:
    parts = dataset(cfg.protocol).training(cfg)
    train, val = parts.train, parts.val
    if val is None:
        train, val = carve_validation(train, num_ids=cfg.val_ids, seed=cfg.split_seed)
    val_q, val_g = evaluation_sets(val)
    test_q, test_g = parts.test_queries, parts.test_gallery
    info = {"root": str(cfg.root_path()), "manifest": cfg.manifest,
            "split_seed": cfg.split_seed, "train_images": len(train),
            "train_ids": len({r.pid for r in train}), "val_ids": len({r.pid for r in val}),
            "test_ids": len({r.pid for r in test_q} | {r.pid for r in test_g}),
            "test_queries": len(test_q), "test_gallery": len(test_g)}
    return DataSplits(train, val_q, val_g, test_q, test_g, cfg.protocol, parts.keep_pids, info)
