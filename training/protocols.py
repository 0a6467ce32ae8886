"""From a data config to the records each stage uses: train, validation, test query/gallery.

One place decides each benchmark's protocol (Section 4 of the paper):

- ``manifest``: a ``path,pid,camid,split`` CSV; ``train_split`` trains, ``test_split`` tests
  (the shared CUHK03 copy: ``train`` / ``val``).
- ``viper``: VIPeR (the manifest if ``manifest`` is set, else the official layout): a seeded
  random 316/316 split of the identities (``split_seed``).
- ``cuhk03``: the official ``cuhk-03.mat`` (labeled boxes): random 1160/100/100 identities.
- ``market1501``: the official folders; query/gallery as released (distractors kept).

Validation (early stopping) holds out ``val_ids`` training identities, except on CUHK03 whose
protocol has its own 100 validation identities. Two-camera sets are evaluated camera 1
(queries) against camera 2 (gallery); others every image against every other, the same-person,
same-camera images being left out by the metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import DataConfig
from .data.manifest import read_manifest
from .data.records import ImageRecord, by_split
from .data.splits import carve_validation, cuhk03_split, query_gallery, viper_split

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


def evaluation_sets(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Queries and gallery for a set of evaluation identities (see the module docstring)."""
    if len({r.camid for r in records}) == 2:
        cams = sorted({r.camid for r in records})
        return query_gallery(records, cams[0], cams[1])
    return list(records), list(records)


def prepare_data(cfg: DataConfig) -> DataSplits:
    root = cfg.root_path()
    keep: tuple[int, ...] = ()
    val = None
    if cfg.protocol == "manifest":
        if not cfg.manifest:
            raise ValueError("data.protocol 'manifest' needs data.manifest")
        records = read_manifest(root / cfg.manifest)
        train, test = by_split(records, cfg.train_split), by_split(records, cfg.test_split)
        for name, part in ((cfg.train_split, train), (cfg.test_split, test)):
            if not part:
                splits = sorted({r.split for r in records})
                raise ValueError(f"{root / cfg.manifest} has no split {name!r}; it has {splits}")
        test_q, test_g = evaluation_sets(test)
    elif cfg.protocol == "viper":
        if cfg.manifest:
            records = read_manifest(root / cfg.manifest)
        else:
            from .data.viper import read_viper
            records = read_viper(root)
        train, test = viper_split(records, cfg.split_seed)
        test_q, test_g = evaluation_sets(test)
    elif cfg.protocol == "cuhk03":
        from .data.cuhk03 import read_cuhk03
        train, val, test = cuhk03_split(read_cuhk03(root), cfg.split_seed)
        test_q, test_g = evaluation_sets(test)
    elif cfg.protocol == "market1501":
        from .data.market1501 import read_market1501
        records = read_market1501(root)
        train = by_split(records, "train")
        test_q, test_g = by_split(records, "query"), by_split(records, "gallery")
        keep = (0,)
    else:
        raise ValueError(f"unknown data.protocol {cfg.protocol!r}; "
                         "use manifest, viper, cuhk03 or market1501")
    if val is None:
        train, val = carve_validation(train, num_ids=cfg.val_ids, seed=cfg.split_seed)
    val_q, val_g = evaluation_sets(val)
    info = {"root": str(root), "manifest": cfg.manifest, "split_seed": cfg.split_seed,
            "train_images": len(train), "train_ids": len({r.pid for r in train}),
            "val_ids": len({r.pid for r in val}),
            "test_ids": len({r.pid for r in test_q} | {r.pid for r in test_g}),
            "test_queries": len(test_q), "test_gallery": len(test_g)}
    return DataSplits(train, val_q, val_g, test_q, test_g, cfg.protocol, keep, info)
