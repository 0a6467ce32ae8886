"""The export manifest (model/formats.py): one typed definition, written by the exporter and
read (checked) by the engine; importable without PyTorch or ONNX Runtime."""

import copy
import json
import shutil
import subprocess
import sys

import pytest

from model.calibration import Calibration
from model.formats import GRAPHS, ExportManifest, GraphFile, ManifestError
from tests.conftest import ROOT

BUNDLED = ROOT / "service" / "default_model"


@pytest.fixture
def bundled() -> dict:
    return json.loads((BUNDLED / "manifest.json").read_text())


def test_formats_imports_without_torch_or_onnxruntime():
    code = ("import sys, model.formats; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime')]; "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_the_bundled_manifest_reads_typed_and_writes_back_unchanged(bundled, tmp_path):
    manifest = ExportManifest.read(BUNDLED)
    assert manifest.input_size == (256, 128)
    assert manifest.map_shape == (1280, 8, 4)
    assert manifest.fields == ("joint", "embedding")
    assert manifest.gallery_fields == {"joint": (64, 8, 4), "embedding": (1280,)}
    assert manifest.graphs["trunk_b"] == GraphFile("trunk_a.onnx", ("images",), ("maps",))
    assert isinstance(manifest.calibration, Calibration) and manifest.mirror_average
    # Key for key and in the same order: a re-written manifest diffs as nothing.
    assert list(manifest.to_dict().items()) == list(bundled.items())
    manifest.write(tmp_path)
    assert (tmp_path / "manifest.json").read_text() == json.dumps(bundled, indent=2) + "\n"
    assert ExportManifest.from_dict(json.loads((tmp_path / "manifest.json").read_text())) \
        == manifest


def test_a_manifest_written_before_calibration_and_flip_reads_with_defaults(bundled):
    for key in ("calibration", "mirror_average", "spec", "versions", "dtypes", "opset"):
        del bundled[key]
    manifest = ExportManifest.from_dict(bundled)
    assert manifest.calibration is None and manifest.mirror_average is False
    assert manifest.to_dict()["calibration"] is None


def _broken(data: dict, path: str, value) -> dict:
    """``data`` with the value at a dotted ``path`` replaced (``...`` deletes it)."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    ("format_version", 2, "version 2"),
    ("format", "other", "format 'other'"),
    ("model_id", ..., "'model_id' missing"),
    ("model_id", 7, "'model_id' must be a non-empty string"),
    ("variant", "", "'variant' must be a non-empty string"),
    ("input_size", [256], r"'input_size' must be \(H, W\)"),
    ("input_size", [256, "128"], "'input_size' must be a list of positive integers"),
    ("map_shape", [1280, 0, 4], "'map_shape' must be a list of positive integers"),
    ("map_shape", [True, 8, 4], "'map_shape' must be a list of positive integers"),
    ("mean", [0.5, 0.5], "'mean' must be a list of 3 numbers"),
    ("fields", [], "'fields' must be a non-empty list of names"),
    ("probe_fields", [], "'probe_fields' must be a JSON object"),
    ("gallery_fields.joint", ..., "'gallery_fields.joint' must be a list of positive"),
    ("graphs.head", ..., "graphs.head.file missing"),
    ("graphs.probe.file", 3, "graphs.probe.file missing or not a file name"),
    ("files.weights.bin", -1, "files.weights.bin must be a size in bytes"),
    ("files", {"../weights.bin": 1}, "must not contain a path"),
    ("calibration.a", -1.0, "calibration a must be positive"),
    ("mirror_average", "yes", "'mirror_average' must be true or false"),
    ("opset", "17", "'opset' must be an integer"),
])
def test_a_bad_field_is_named(bundled, path, value, message):
    if path.startswith("files.weights.bin"):  # the file name holds a dot
        data = copy.deepcopy(bundled)
        data["files"]["weights.bin"] = value
    else:
        data = _broken(bundled, path, value)
    with pytest.raises(ManifestError, match=message):
        ExportManifest.from_dict(data, where="m.json")


def test_the_folder_must_hold_every_listed_file_at_its_size(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(BUNDLED, folder)
    with (folder / "head.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="truncated or replaced"):
        ExportManifest.read(folder)
    assert ExportManifest.read(folder, check_files=False).model_id  # the manifest itself is fine
    (folder / "probe.onnx").unlink()
    with pytest.raises(ManifestError, match="incomplete: probe.onnx is missing"):
        ExportManifest.read(folder)
    with pytest.raises(ManifestError, match="no manifest.json"):
        ExportManifest.read(tmp_path)
    with pytest.raises(ManifestError, match="not found"):
        ExportManifest.read(tmp_path / "nothing")
    (folder / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="must hold a JSON object"):
        ExportManifest.read(folder)


def test_a_manifest_built_without_every_graph_or_field_shape_is_refused(bundled):
    manifest = ExportManifest.from_dict(bundled)
    fields = {k: getattr(manifest, k) for k in manifest.__dataclass_fields__}
    with pytest.raises(ManifestError, match="graphs.head.file missing"):
        ExportManifest(**{**fields, "graphs": {k: v for k, v in manifest.graphs.items()
                                               if k != "head"}})
    with pytest.raises(ManifestError, match=r"probe_fields lacks the shape of \['embedding'\]"):
        ExportManifest(**{**fields, "probe_fields": {"joint": (64, 8, 4)}})
    assert set(GRAPHS) <= set(manifest.graphs)
