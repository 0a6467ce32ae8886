"""The exported model folder's format, one definition read by the exporter
(:mod:`model.export`, PyTorch) and the service's engine (:mod:`service.engine`, no PyTorch).

:class:`ExportManifest` is ``manifest.json``: the exporter builds one and writes it
(:meth:`ExportManifest.write`), the engine reads it back (:meth:`ExportManifest.read`), which
checks every field it types and that the folder holds the files it lists, at their sizes.
Importing this module needs neither PyTorch nor ONNX Runtime (NumPy only, through
:mod:`model.calibration`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calibration import Calibration, CalibrationError

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "MANIFEST_FILE", "WEIGHTS_FILE",
           "EMBEDDING_FIELD", "GRAPHS", "INPUT_LAYOUT", "ManifestError", "GraphFile",
           "ExportManifest"]

MANIFEST_FORMAT = "dsmi-onnx"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"  # every graph's large tensors, each stored once
# The per-image embedding FC(g) that every variant exports on both sides (probe and gallery):
# stage one of two-stage retrieval ranks a gallery by its cosine (model/retrieval.py).
EMBEDDING_FIELD = "embedding"
# The graphs every folder has (trunk_b may name trunk_a's file: one trunk for both streams).
GRAPHS = ("trunk_a", "trunk_b", "probe", "gallery", "head")
INPUT_LAYOUT = "NCHW, RGB, (pixel / 255 - mean) / std"
_DTYPES = {"images": "float32", "maps": "float32", "fields": "float32", "scores": "float32"}


class ManifestError(ValueError):
    """A manifest that is missing, not JSON, of another format or version, lacks a field or
    holds one of the wrong type, or whose folder lacks a file it lists (or holds it at
    another size). The message names the file and the field."""


# -- checking readers: one per JSON type, each naming the field it reads ----------------------


def _get(data: Mapping[str, Any], key: str, where: str, optional: bool = False) -> Any:
    if key not in data:
        if optional:
            return None
        raise ManifestError(f"{where}: {key!r} missing")
    return data[key]


def _str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: {what!r} must be a non-empty string, not {value!r}")
    return value


def _shape(value: Any, what: str, where: str) -> tuple[int, ...]:
    # bool is an int to Python; a shape of True is a mistake, not 1
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ManifestError(f"{where}: {what!r} must be a list of positive integers, "
                            f"not {value!r}")
    return tuple(value)


def _floats(value: Any, what: str, where: str, n: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ManifestError(f"{where}: {what!r} must be a list of {n} numbers, not {value!r}")
    return tuple(float(v) for v in value)


def _names(value: Any, what: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise ManifestError(f"{where}: {what!r} must be a non-empty list of names, "
                            f"not {value!r}")
    return tuple(value)


def _object(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: {what!r} must be a JSON object, not {value!r}")
    return value


def _bool(value: Any, what: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"{where}: {what!r} must be true or false, not {value!r}")
    return value


@dataclass(frozen=True)
class GraphFile:
    """One ONNX graph of the folder: its file and its input and output names."""

    file: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": list(self.inputs), "outputs": list(self.outputs)}

    @classmethod
    def from_dict(cls, data: Any, what: str, where: str) -> GraphFile:
        data = _object(data, what, where)
        file = data.get("file")
        if not isinstance(file, str) or not file:
            raise ManifestError(f"{where}: {what}.file missing or not a file name")
        inputs, outputs = data.get("inputs", []), data.get("outputs", [])
        for key, names in (("inputs", inputs), ("outputs", outputs)):
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ManifestError(f"{where}: {what}.{key} must be a list of names, "
                                    f"not {names!r}")
        return cls(file, tuple(inputs), tuple(outputs))


@dataclass(frozen=True)
class ExportManifest:
    """``manifest.json`` of an exported model folder.

    What the engine needs: ``model_id`` (a hash of the weights and architecture; the cache
    namespace), ``input_size`` ``(H, W)``, ``mean``/``std`` (3 each, the normalisation),
    ``map_shape`` ``(C, K1, K2)`` (the trunk's conv5 map), ``fields`` (the per-image tensors
    of each side, in the graphs' order), ``probe_fields``/``gallery_fields`` (field -> shape
    of one item, no batch axis), ``graphs`` (each of :data:`GRAPHS` -> its file and names),
    ``files`` (file name -> size in bytes: the folder must hold each, at that size),
    ``calibration`` (the match probability; ``None``: the model reports none). The rest
    describes the export for people and tools (``build_args``, ``spec``, ``versions``, ...);
    a manifest written before a field existed reads with its default.
    """

    model_id: str
    variant: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    map_shape: tuple[int, ...]
    fields: tuple[str, ...]
    probe_fields: dict[str, tuple[int, ...]]
    gallery_fields: dict[str, tuple[int, ...]]
    graphs: dict[str, GraphFile]
    files: dict[str, int]
    calibration: Calibration | None = None
    mirror_average: bool = False    # test-time flip baked into the trunk graph
    shares_trunk: bool = True       # trunk_b is trunk_a's file
    build_args: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] | None = None
    input_layout: str = INPUT_LAYOUT
    dtypes: dict[str, str] = field(default_factory=lambda: dict(_DTYPES))
    opset: int | tuple[int, ...] = 17
    exporter: str = ""
    weights_file: str = WEIGHTS_FILE
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # What the engine relies on, whoever built the object (the exporter or a reader).
        for side, spec in (("probe_fields", self.probe_fields),
                           ("gallery_fields", self.gallery_fields)):
            missing = [f for f in self.fields if f not in spec]
            if missing:
                raise ManifestError(f"manifest: {side} lacks the shape of {missing}")
        missing = [g for g in GRAPHS if g not in self.graphs]
        if missing:
            raise ManifestError(f"manifest: graphs.{missing[0]}.file missing")
        for file in self.files:
            if not file or Path(file).name != file:
                raise ManifestError(f"manifest: file name {file!r} must not contain a path")

    # -- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds (lists for tuples; the key order is the
        one the exporter always wrote)."""
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "model_id": self.model_id,
            "variant": self.variant,
            "build_args": dict(self.build_args),
            "spec": dict(self.spec) if self.spec is not None else None,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "input_layout": self.input_layout,
            "shares_trunk": self.shares_trunk,
            "mirror_average": self.mirror_average,
            "map_shape": list(self.map_shape),
            "fields": list(self.fields),
            "probe_fields": {f: list(s) for f, s in self.probe_fields.items()},
            "gallery_fields": {f: list(s) for f, s in self.gallery_fields.items()},
            "dtypes": dict(self.dtypes),
            "opset": self.opset if isinstance(self.opset, int) else list(self.opset),
            "exporter": self.exporter,
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "weights_file": self.weights_file,
            "files": dict(self.files),
            "versions": dict(self.versions),
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> ExportManifest:
        """A manifest's JSON object -> the manifest. Raises :class:`ManifestError` naming
        ``where`` and the field for another format or version, a missing required field, or
        one of the wrong type. Keys it does not know are ignored (a later exporter's
        additions)."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} must hold a JSON object, not {type(data).__name__}")
        fmt, version = data.get("format"), data.get("format_version")
        if fmt != MANIFEST_FORMAT or version != MANIFEST_VERSION:
            raise ManifestError(f"{where} is of format {fmt!r} version {version!r}; this "
                                f"reader reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}")

        def get(key: str, optional: bool = False) -> Any:
            return _get(data, key, where, optional)

        input_size = _shape(get("input_size"), "input_size", where)
        if len(input_size) != 2:
            raise ManifestError(f"{where}: 'input_size' must be (H, W), not {input_size}")
        fields = _names(get("fields"), "fields", where)
        sides = {}
        for side in ("probe_fields", "gallery_fields"):
            spec = _object(get(side), side, where)
            sides[side] = {f: _shape(spec.get(f), f"{side}.{f}", where) for f in fields}
        graphs = _object(get("graphs"), "graphs", where)
        for key in GRAPHS:
            if key not in graphs:
                raise ManifestError(f"{where}: graphs.{key}.file missing")
        files = _object(get("files"), "files", where)
        for file, size in files.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ManifestError(f"{where}: files.{file} must be a size in bytes, "
                                    f"not {size!r}")
        calibration = get("calibration", optional=True)
        try:
            # The match probability fitted in training; a model without one reports none.
            calibration = Calibration.from_dict(calibration) if calibration else None
        except (CalibrationError, TypeError) as exc:
            raise ManifestError(f"{where}: {exc}") from exc
        opset = get("opset", optional=True)
        spec = get("spec", optional=True)
        optional: dict[str, Any] = {}
        for key, check in (("mirror_average", _bool), ("shares_trunk", _bool),
                           ("build_args", _object), ("dtypes", _object),
                           ("versions", _object), ("input_layout", _str), ("exporter", _str),
                           ("weights_file", _str)):
            if data.get(key) is not None:
                optional[key] = check(data[key], key, where)
        if opset is not None:
            if isinstance(opset, list) and all(isinstance(v, int) for v in opset):
                opset = tuple(opset)
            elif not isinstance(opset, int) or isinstance(opset, bool):
                raise ManifestError(f"{where}: 'opset' must be an integer or a list of "
                                    f"them, not {opset!r}")
            optional["opset"] = opset
        try:
            return cls(
                model_id=_str(get("model_id"), "model_id", where),
                variant=_str(get("variant"), "variant", where),
                input_size=input_size,  # type: ignore[arg-type]  # length checked above
                mean=_floats(get("mean"), "mean", where, 3),  # type: ignore[arg-type]
                std=_floats(get("std"), "std", where, 3),  # type: ignore[arg-type]
                map_shape=_shape(get("map_shape"), "map_shape", where),
                fields=fields,
                probe_fields=sides["probe_fields"],
                gallery_fields=sides["gallery_fields"],
                graphs={k: GraphFile.from_dict(g, f"graphs.{k}", where)
                        for k, g in graphs.items()},
                files=dict(files),
                calibration=calibration,
                spec=_object(spec, "spec", where) if spec is not None else None,
                **optional)
        except ManifestError as exc:  # __post_init__'s, said of this file
            raise ManifestError(str(exc).replace("manifest:", f"{where}:", 1)) from None

    # -- the folder -------------------------------------------------------------------------

    @classmethod
    def read(cls, folder: str | Path, check_files: bool = True) -> ExportManifest:
        """The manifest of an exported model folder. ``check_files``: also require every
        file it lists to be in the folder at the size it says (a truncated or replaced file
        is caught before ONNX Runtime reads it). Raises :class:`ManifestError`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"model folder not found: {folder}")
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{folder} has no {MANIFEST_FILE}: not an exported model "
                                "folder (write one with 'dsmi export')")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
        manifest = cls.from_dict(data, where=str(path))
        if check_files:
            manifest.check_files(folder)
        return manifest

    def check_files(self, folder: str | Path) -> None:
        """Every listed file (and every graph's file) is in ``folder`` at its listed size."""
        folder = Path(folder)
        for file in [*self.files, *(g.file for g in self.graphs.values())]:
            if Path(file).name != file:
                raise ManifestError(f"{folder / MANIFEST_FILE}: file name {file!r} must not "
                                    "contain a path")
            if not (folder / file).is_file():
                raise ManifestError(f"{folder} is incomplete: {file} is missing")
        for file, size in self.files.items():
            got = (folder / file).stat().st_size
            if got != size:
                raise ManifestError(f"{folder / file} has {got} bytes, the manifest says "
                                    f"{size}: truncated or replaced")

    def write(self, folder: str | Path) -> Path:
        """Write ``manifest.json`` into ``folder``; returns its path."""
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path
