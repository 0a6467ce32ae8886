"""Datasets: records, readers for the official layouts and manifests, splits, augmentation."""

from .manifest import ManifestError, read_manifest
from .records import ImageRecord, by_split, identities, relabel

__all__ = ["ImageRecord", "by_split", "identities", "relabel", "read_manifest", "ManifestError"]
