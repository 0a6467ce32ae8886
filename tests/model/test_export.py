"""ONNX export (model/export.py): every small variant, checked, reproducing PyTorch's scores."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dsmi_cli.main import main as dsmi
from model import build_model, list_variants
from model.checkpoint import save_checkpoint
from model.export import export_model, model_id
from model.formats import ExportManifest
from tests.conftest import ROOT

SMALL = [v for v in list_variants() if v.endswith("-small")]
# The paper's VGG-16 network at a tiny input: its tail (output conv, then the FC) is not fused,
# unlike the small variants', so the head takes the other path.
PAPER_TINY = "dsmi@64x32"


def _build(name):
    torch.manual_seed(0)
    if name == PAPER_TINY:
        return build_model("dsmi", input_size=(64, 32)).eval()
    if name.endswith("-lite0"):  # random weights: the export, not ImageNet, is under test
        return build_model(name, weights=None).eval()
    return build_model(name).eval()


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session", params=SMALL + [PAPER_TINY])
def exported(request, tmp_path_factory):
    net = _build(request.param)
    out = tmp_path_factory.mktemp("export") / request.param.replace("@", "-")
    manifest = export_model(net, out)
    return net, out, manifest


def _run_graphs(out, manifest, images_a, images_b):
    sessions = {k: _session(out / g.file) for k, g in manifest.graphs.items()}
    maps_a = sessions["trunk_a"].run(None, {"images": images_a})[0]
    maps_b = sessions["trunk_b"].run(None, {"images": images_b})[0]
    fields = list(manifest.fields)
    feed = dict(zip((f"probe_{f}" for f in fields),
                    sessions["probe"].run(fields, {"maps": maps_a}), strict=True))
    feed.update(zip((f"gallery_{f}" for f in fields),
                    sessions["gallery"].run(fields, {"maps": maps_b}), strict=True))
    return maps_a, maps_b, sessions["head"].run(None, feed)[0]


def test_graphs_pass_the_onnx_checker(exported):
    _, out, manifest = exported
    for graph in manifest.graphs.values():
        onnx.checker.check_model(str(out / graph.file), full_check=True)


def test_manifest_describes_the_model(exported):
    net, out, manifest = exported
    # What the exporter returns is what a reader of the folder gets, field for field.
    assert ExportManifest.read(out) == manifest
    assert json.loads((out / "manifest.json").read_text()) == manifest.to_dict()
    assert manifest.variant == net.variant
    assert manifest.model_id == model_id(net)
    assert manifest.input_size == net.input_size
    assert manifest.opset == 17
    with torch.no_grad():
        maps = net.encode(torch.zeros(1, 3, *net.input_size))
        feats = net.prepare_gallery(maps)
    assert manifest.map_shape == tuple(maps.shape[1:])
    assert manifest.fields == type(feats)._fields
    assert manifest.gallery_fields == {f: tuple(t.shape[1:]) for f, t in
                                       zip(feats._fields, feats, strict=True)}
    for file, size in manifest.files.items():
        assert (out / file).stat().st_size == size
    separate = manifest.graphs["trunk_b"].file != manifest.graphs["trunk_a"].file
    assert separate == (not net.shares_trunk)
    assert manifest.shares_trunk == net.shares_trunk


@pytest.mark.parametrize("n", [1, 2, 13])
def test_onnx_scores_equal_pytorch(exported, n):
    net, out, manifest = exported
    images = torch.randn(n + 1, 3, *net.input_size, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        maps_a, maps_b = net.encode(images[:1], "a"), net.encode(images[1:], "b")
        expected = net.score(maps_a, maps_b).numpy()
    got_a, got_b, scores = _run_graphs(out, manifest, images[:1].numpy(), images[1:].numpy())
    assert scores.shape == (n,)
    np.testing.assert_allclose(got_a, maps_a.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_b, maps_b.numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(scores - expected).max() < 1e-4


@pytest.mark.parametrize("name", ["bcnn-irnn-small", PAPER_TINY, "dsmi-lite0"])
def test_head_graph_reproduces_pytorch_scores(tmp_path, name):
    net = _build(name)
    images = torch.randn(6, 3, *net.input_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = net.score(net.encode(images[:1]), net.encode(images[1:], "b")).numpy()
    manifest = export_model(net, tmp_path / "m")
    *_, scores = _run_graphs(tmp_path / "m", manifest, images[:1].numpy(), images[1:].numpy())
    assert np.abs(scores - expected).max() < 1e-4


@pytest.mark.parametrize("name", ["dsmi-small", PAPER_TINY])
def test_a_weight_shared_by_two_graphs_is_stored_once(tmp_path, name):
    net = _build(name)
    manifest = export_model(net, tmp_path / "m")

    def external(file):
        model = onnx.load(str(tmp_path / "m" / file), load_external_data=False)
        return {tuple((e.key, e.value) for e in t.external_data)
                for t in model.graph.initializer if t.external_data}

    probe, gallery = external("probe.onnx"), external("gallery.onnx")
    # The FC of the two per-image sides is the same tensor: one record, read by both.
    assert probe & gallery
    if name == PAPER_TINY:  # unfused tail: the head runs the same FC weight
        assert probe & gallery & external("head.onnx")
    fc_bytes = net.fc.weight.numel() * 4
    stored = manifest.files["weights.bin"]
    params = sum(p.numel() * 4 for p in net.parameters())
    assert stored < params + fc_bytes  # FC weight once, not twice (plus the fused head)


def test_model_id_follows_the_weights():
    torch.manual_seed(0)
    a = build_model("dsmi-small")
    torch.manual_seed(0)
    b = build_model("dsmi-small")
    assert model_id(a) == model_id(b)
    with torch.no_grad():
        b.fc.bias[0] += 1e-3
    assert model_id(a) != model_id(b)
    # Equal weight shapes, another function (no sigmoid in the gate): another id.
    torch.manual_seed(0)
    linear = build_model("dsmi-small", fusion="gate-linear")
    linear.load_state_dict(a.state_dict())
    assert model_id(linear) != model_id(a)


def test_model_ids_of_specs_from_before_the_stripes_field_stay_the_same():
    import dataclasses

    from model.factory import VariantSpec

    net = build_model("dsmi-small")
    today = model_id(net)
    # The spec as models exported before the field was added had it.
    old_fields = [(f.name, f.type, dataclasses.field(default=None))
                  for f in dataclasses.fields(VariantSpec) if f.name != "stripes"]
    old_spec = dataclasses.make_dataclass("OldSpec", old_fields)
    net.spec = old_spec(**{k: v for k, v in dataclasses.asdict(net.spec).items()
                           if k != "stripes"})
    assert model_id(net) == today
    net.spec = dataclasses.replace(build_model("dsmi-small").spec, stripes=2)
    assert model_id(net) != today


def test_checkpoint_exports_through_the_cli_with_the_weights_id(tmp_path, capsys):
    torch.manual_seed(3)
    net = build_model("dsmi-vggd-vggm-small")
    ckpt = save_checkpoint(tmp_path / "c.pt", net, epoch=2)
    assert dsmi(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m")]) == 0
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["model_id"] == model_id(net)
    assert manifest["variant"] == "dsmi-vggd-vggm-small"
    assert "trunk_b.onnx" in manifest["files"]
    assert "max |score difference|" in capsys.readouterr().out


def test_cli_exports_a_random_variant_reproducibly(tmp_path):
    for name in ("a", "b"):
        assert dsmi(["export", "--variant", "fc-cnn-small", "--out", str(tmp_path / name),
                     "--no-verify"]) == 0
    ids = [json.loads((tmp_path / n / "manifest.json").read_text())["model_id"]
           for n in ("a", "b")]
    assert ids[0] == ids[1]  # seed 0 by default
    assert dsmi(["export", "--variant", "fc-cnn-small", "--seed", "1", "--out",
                 str(tmp_path / "c"), "--no-verify"]) == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["model_id"] != ids[0]
    assert (tmp_path / "a").stat().st_mode & 0o755 == 0o755  # readable by a service's user


def test_failed_export_keeps_the_previous_folder(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = build_model("fc-cnn-small").eval()
    out = tmp_path / "m"
    first = export_model(net, out)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("model.export._externalise", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(net, out)
    assert ExportManifest.read(out) == first
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind


def test_dynamo_exporter_also_reproduces_pytorch(tmp_path):
    torch.manual_seed(0)
    net = build_model("dsmi-small").eval()
    manifest = export_model(net, tmp_path / "m", opset=18, exporter="dynamo")
    assert manifest.exporter == "torch.onnx.export(dynamo=True)"
    images = torch.randn(6, 3, *net.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net.score(net.encode(images[:1]), net.encode(images[1:], "b")).numpy()
    *_, scores = _run_graphs(tmp_path / "m", manifest, images[:1].numpy(), images[1:].numpy())
    assert np.abs(scores - expected).max() < 1e-4


def test_a_checkpoint_written_by_training_exports(tiny_manifest, tmp_path):
    from model.checkpoint import load_checkpoint
    from training.config import load_config
    from training.train import Trainer

    overrides = {"data.root": str(tiny_manifest.parent), "data.manifest": tiny_manifest.name,
                 "data.test_split": "test", "data.val_ids": 3, "train.batch_size": 16,
                 "train.epochs": 1, "train.max_minutes": "null", "train.threads": 1}
    cfg = load_config(ROOT / "configs" / "cpu.yaml", [f"{k}={v}" for k, v in overrides.items()])
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    ckpt = tmp_path / "run" / "best.pt"
    assert dsmi(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m")]) == 0
    net, _ = load_checkpoint(ckpt)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["model_id"] == model_id(net)
    assert manifest["variant"] == net.variant


def test_bnneck_model_with_mirror_average_and_calibration_exports_exactly(tmp_path):
    from model.calibration import Calibration
    from model.export import model_id, verify_export

    torch.manual_seed(0)
    net = build_model("dsmi-lite0-bnneck", weights=None, input_size=(64, 32)).eval()
    with torch.no_grad():
        net.pooling.out_proj.weight.normal_(std=0.05)  # a live head
    net.mirror_average = True
    calibration = Calibration(a=7.5, b=-4.0, pairs=10, positives=2, fitted_on="test")
    manifest = export_model(net, tmp_path / "m", calibration=calibration)
    assert manifest.mirror_average is True
    net.mirror_average = False  # other maps, so another id (and cache namespace)
    assert manifest.model_id != model_id(net)
    net.mirror_average = True
    assert manifest.calibration == calibration
    assert ExportManifest.read(tmp_path / "m").calibration == calibration
    assert verify_export(net, tmp_path / "m") < 1e-4


def test_striped_bnneck_model_exports_exactly(tmp_path):
    from model.export import verify_export

    torch.manual_seed(3)
    net = build_model("dsmi-lite0-stripes", weights=None, input_size=(64, 32)).eval()
    with torch.no_grad():  # a trained-looking norm and a live head
        net.fc.bn.running_var.uniform_(0.5, 2.0)
        net.pooling.out_proj.weight.normal_(std=0.05)
    export_model(net, tmp_path / "m")
    assert verify_export(net, tmp_path / "m") < 1e-4
