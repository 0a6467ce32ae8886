"""The ONNX Runtime engine (service/engine.py): PyTorch's scores, batching, cache bytes, errors."""

import json
import shutil
import subprocess
import sys
from itertools import pairwise

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model import build_model
from model.export import export_model
from service.engine import (
    CPU,
    CUDA,
    PROVIDERS_ENV,
    Engine,
    ImageDecodeError,
    ModelFolderError,
    resolve_providers,
)
from tests.conftest import ROOT

CPU_ONLY = ["CPUExecutionProvider"]


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("dsmi-small").eval()
    out = tmp_path_factory.mktemp("engine") / "dsmi-small"
    export_model(net, out)
    return net, out


@pytest.fixture(scope="session")
def engine(small):
    return Engine(small[1], providers=CPU_ONLY, batch_size=8)


def _images(n, seed=0, size=(128, 64)):
    return np.random.default_rng(seed).standard_normal((n, 3, *size)).astype(np.float32)


@pytest.fixture(scope="session")
def cuhk03_val(data_dir):
    """CUHK03 val records: 1 probe and 50 gallery images (a camera-A probe, the rest)."""
    from training.data import read_manifest

    records = [r for r in read_manifest(data_dir / "cuhk03-labeled.csv", check_files=False)
               if r.split == "val"]
    return records[:51]


def _calibrated(name, records):
    """A random model whose batch-norm statistics come from real images: its scores spread
    like a trained model's (a plain random init scores everything within 1e-3 of 1)."""
    from model.preprocess import load_image_tensor

    torch.manual_seed(0)
    net = build_model(name)
    images = torch.from_numpy(np.stack([load_image_tensor(r.path, net.input_size)
                                        for r in records]))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
    net.train()
    with torch.no_grad():
        net.encode(images)
    return net.eval()


# -- loading and providers ------------------------------------------------------------------


def test_engine_reads_the_manifest(engine, small):
    net, out = small
    manifest = json.loads((out / "manifest.json").read_text())
    assert engine.model_id == manifest["model_id"]
    assert engine.variant == "dsmi-small"
    assert engine.input_size == (128, 64)
    assert engine.gallery_fields == ("joint", "embedding")
    assert engine.gallery_spec == {"joint": ((64, 8, 4), "float32"),
                                   "embedding": ((128,), "float32")}
    assert engine.providers == CPU_ONLY
    assert engine.cache_namespace == f"{engine.model_id}-float32"


def test_auto_providers_fall_back_to_a_provider_that_really_runs(small):
    auto = Engine(small[1], warmup=False)
    asked = Engine(small[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                   warmup=False)
    for e in (auto, asked):
        # What ONNX Runtime really runs, never more than asked for, CPU always the fallback.
        assert e.providers == e._sessions["head"].get_providers()
        assert e.providers[-1] == CPU
        assert set(e.providers) <= {CUDA, CPU}
    assert auto.providers == asked.providers


def test_provider_names_env_and_aliases(monkeypatch):
    monkeypatch.setenv(PROVIDERS_ENV, "cpu")
    assert resolve_providers() == [CPU]
    assert resolve_providers(["NoSuchExecutionProvider"]) == [CPU]
    monkeypatch.delenv(PROVIDERS_ENV)
    if CUDA in ort.get_available_providers():
        assert resolve_providers(["cuda", "cpu"])[0] in (CUDA, CPU)
    assert resolve_providers(["CPUExecutionProvider", "cpu"]) == [CPU]


def test_without_a_gpu_cuda_is_not_asked_for_and_the_log_says_why(monkeypatch, caplog):
    import service.engine as engine_module

    monkeypatch.delenv(PROVIDERS_ENV, raising=False)
    monkeypatch.setattr(engine_module.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(engine_module, "nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(engine_module, "_UNUSABLE", set())  # what earlier tests learnt
    with caplog.at_level("INFO", logger="service.engine"):
        assert resolve_providers() == [CPU]
    assert "no NVIDIA GPU" in caplog.text
    monkeypatch.setattr(engine_module, "nvidia_gpu_present", lambda: True)
    assert resolve_providers() == [CUDA, CPU]
    monkeypatch.setattr(engine_module, "nvidia_gpu_present", lambda: False)
    assert resolve_providers(["cuda"]) == [CUDA, CPU]  # asked for by name: tried anyway


def test_engine_module_does_not_import_torch():
    code = ("import sys, service.engine, model.preprocess; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def _broken_copy(small, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(small[1], target)
    return target


@pytest.mark.parametrize("breakage, message", [
    ("no folder", "not found"),
    ("no manifest", "no manifest.json"),
    ("bad json", "not valid JSON"),
    ("other format", "format"),
    ("no model id", "model_id"),
    ("ill-typed shape", "'map_shape' must be a list of positive integers"),
    ("missing graph", "missing"),
    ("truncated weights", "truncated"),
    ("garbage graph", "cannot load"),
])
def test_bad_model_folders_give_a_clear_error(small, tmp_path, breakage, message):
    folder = _broken_copy(small, tmp_path, "m")
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if breakage == "no folder":
        shutil.rmtree(folder)
    elif breakage == "no manifest":
        manifest_path.unlink()
    elif breakage == "bad json":
        manifest_path.write_text("{not json")
    elif breakage == "other format":
        manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    elif breakage == "no model id":
        del manifest["model_id"]
        manifest_path.write_text(json.dumps(manifest))
    elif breakage == "ill-typed shape":
        manifest_path.write_text(json.dumps({**manifest, "map_shape": "512x8x4"}))
    elif breakage == "missing graph":
        (folder / "head.onnx").unlink()
    elif breakage == "truncated weights":
        with (folder / "weights.bin").open("r+b") as fh:
            fh.truncate(1000)
    elif breakage == "garbage graph":
        size = (folder / "head.onnx").stat().st_size
        (folder / "head.onnx").write_bytes(b"\x07" * size)  # same size, not a graph
    with pytest.raises(ModelFolderError, match=message):
        Engine(folder, providers=CPU_ONLY)


def test_bad_settings_are_refused(small):
    with pytest.raises(ValueError, match="cache_dtype"):
        Engine(small[1], cache_dtype="int8")
    with pytest.raises(ValueError, match="batch"):
        Engine(small[1], batch_size=0)
    with pytest.raises(ValueError, match="batch"):
        Engine(small[1], head_batch_size=0)
    with pytest.raises(ValueError, match="head_threads"):
        Engine(small[1], head_threads=0)


# -- images and scores -----------------------------------------------------------------------


def test_preprocess_equals_the_training_dataset(engine, data_dir, cuhk03_val):
    from training.data import read_manifest
    from training.data.dataset import ReIDImages

    viper = read_manifest(data_dir / "viper.csv", check_files=False)[:2]  # PNG
    records = cuhk03_val[:2] + viper                                       # JPEG
    dataset = ReIDImages(records, engine.input_size)
    for k, rec in enumerate(records):
        expected = dataset[k][0].numpy()
        from_path = engine.preprocess(rec.path)
        from_bytes = engine.preprocess(rec.path.read_bytes())
        assert from_path.dtype == np.float32 and from_path.shape == (3, 128, 64)
        np.testing.assert_array_equal(from_path, expected)
        np.testing.assert_array_equal(from_bytes, expected)


def test_preprocess_rejects_what_is_not_an_image(engine):
    with pytest.raises(ImageDecodeError):
        engine.preprocess(b"GIF89a but not really")


def test_engine_reproduces_pytorch_on_real_images(tmp_path, cuhk03_val):
    net = _calibrated("dsmi-small", cuhk03_val)
    export_model(net, tmp_path / "m")
    engine = Engine(tmp_path / "m", providers=CPU_ONLY, batch_size=16)
    images = np.stack([engine.preprocess(r.path) for r in cuhk03_val])
    with torch.no_grad():
        x = torch.from_numpy(images)
        expected = net.score(net.encode(x[:1], "a"), net.encode(x[1:], "b")).numpy()
    maps_b = engine.encode(images[1:], "b")
    scores = engine.score(engine.prepare_probe(engine.encode(images[:1], "a")),
                          engine.prepare_gallery(maps_b))
    assert scores.shape == (50,) and scores.dtype == np.float32
    assert np.abs(scores - expected).max() < 1e-4
    assert expected.std() > 1e-2  # the check below means something only if scores spread
    np.testing.assert_array_equal(np.argsort(-scores)[:10], np.argsort(-expected)[:10])


def test_separate_trunks_and_single_field_variants(tmp_path):
    for name in ("dsmi-vggd-vggm-small", "fc-cnn-small"):
        torch.manual_seed(1)
        net = build_model(name).eval()
        export_model(net, tmp_path / name)
        engine = Engine(tmp_path / name, providers=CPU_ONLY)
        images = _images(4, seed=2)
        with torch.no_grad():
            x = torch.from_numpy(images)
            maps_a, maps_b = net.encode(x, "a"), net.encode(x, "b")
            expected = net.score(maps_a[:1], maps_b).numpy()
        got_a, got_b = engine.encode(images, "a"), engine.encode(images, "b")
        np.testing.assert_allclose(got_a, maps_a.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_b, maps_b.numpy(), rtol=1e-4, atol=1e-4)
        assert engine.gallery_fields == tuple(type(net.prepare_gallery(maps_a))._fields)
        scores = engine.score(engine.prepare_probe(got_a[:1]), engine.prepare_gallery(got_b))
        assert np.abs(scores - expected).max() < 1e-4


class _CountingSession:
    """Wraps the head session to record how many gallery items each call gets."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def run(self, names, feed):
        self.sizes.append(len(feed["gallery_embedding"]))
        return self.session.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_streamed_batches_equal_one_shot_scoring(small, monkeypatch):
    engine = Engine(small[1], providers=CPU_ONLY, batch_size=8, head_threads=1)
    maps = engine.encode(_images(41, seed=3), "b")
    probe = engine.prepare_probe(maps[:1])
    gallery = engine.prepare_gallery(maps)
    whole = Engine(small[1], providers=CPU_ONLY, batch_size=64).score(probe, gallery)

    counter = _CountingSession(engine._sessions["head"])
    monkeypatch.setitem(engine._sessions, "head", counter)
    bounds = [0, 5, 6, 30, 41]

    def batches():  # lazily: each batch is handed out only after the last one was scored
        for k, (lo, hi) in enumerate(pairwise(bounds)):
            assert sum(counter.sizes) == lo, f"batch {k} asked for before the last was scored"
            yield {f: v[lo:hi] for f, v in gallery.items()}

    streamed = engine.score(probe, batches())
    assert streamed.shape == (41,)
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
    assert max(counter.sizes) <= engine.batch_size  # memory bounded by the batch size
    assert counter.sizes == [5, 1, 8, 8, 8, 8, 3]  # 5, 1, 24 and 11 items in chunks of 8
    assert engine.score(probe, iter([])).shape == (0,)


def test_head_threads_score_chunks_side_by_side_in_order(small, monkeypatch):
    serial = Engine(small[1], providers=CPU_ONLY, batch_size=64, head_threads=1)
    engine = Engine(small[1], providers=CPU_ONLY, batch_size=64, head_threads=2)
    assert engine.head_threads == 2
    maps = engine.encode(_images(150, seed=5), "b")
    probe = engine.prepare_probe(maps[:1])
    gallery = engine.prepare_gallery(maps)
    expected = serial.score(probe, gallery)

    counter = _CountingSession(engine._sessions["head"])
    monkeypatch.setitem(engine._sessions, "head", counter)
    # One batch of 100 is cut in two chunks of 50, one per thread; 150 in chunks of 64.
    np.testing.assert_allclose(engine.score(probe, {f: v[:100] for f, v in gallery.items()}),
                               expected[:100], atol=1e-6)
    assert sorted(counter.sizes) == [50, 50]
    counter.sizes.clear()
    np.testing.assert_allclose(engine.score(probe, gallery), expected, atol=1e-6)
    assert sorted(counter.sizes) == [22, 64, 64]

    pulled = []

    def batches():  # 15 batches of 10: never more than two chunks per thread ahead
        for k in range(0, 150, 10):
            assert len(pulled) - len(counter.sizes) <= 2 * engine.head_threads
            pulled.append(k)
            yield {f: v[k:k + 10] for f, v in gallery.items()}

    counter.sizes.clear()
    np.testing.assert_allclose(engine.score(probe, batches()), expected, atol=1e-6)
    assert len(pulled) == 15

    def broken():
        yield {f: v[:10] for f, v in gallery.items()}
        yield {"embedding": gallery["embedding"][:10]}

    with pytest.raises(ValueError, match="lacks field 'joint'"):
        engine.score(probe, broken())


def test_scoring_rejects_malformed_input(engine):
    maps = engine.encode(_images(3), "b")
    probe, gallery = engine.prepare_probe(maps[:1]), engine.prepare_gallery(maps)
    with pytest.raises(ValueError, match="one probe"):
        engine.score(engine.prepare_probe(maps[:2]), gallery)
    with pytest.raises(ValueError, match="lacks field 'joint'"):
        engine.score(probe, {"embedding": gallery["embedding"]})
    with pytest.raises(ValueError, match="shape"):
        engine.score(probe, {**gallery, "joint": gallery["joint"][:, :3]})
    with pytest.raises(ValueError, match="differ in length"):
        engine.score(probe, {**gallery, "joint": gallery["joint"][:2]})
    with pytest.raises(ValueError, match="images must have shape"):
        engine.encode(_images(1, size=(64, 32)))
    with pytest.raises(ValueError, match="stream"):
        engine.encode(_images(1), "c")
    assert engine.encode(np.zeros((0, 3, 128, 64), np.float32)).shape == (0, 512, 8, 4)


# -- cache bytes and float16 -----------------------------------------------------------------


def test_bytes_round_trip_and_validation(engine):
    maps = engine.encode(_images(3, seed=4), "b")
    gallery = engine.prepare_gallery(maps)
    items = [{f: v[k] for f, v in gallery.items()} for k in range(3)]
    blobs = [engine.codec.encode(item) for item in items]
    assert len(blobs[0]["embedding"]) == 128 * 4
    batch = engine.codec.decode(blobs)
    assert set(batch) == set(engine.gallery_fields)
    for f in ("joint", "embedding"):
        np.testing.assert_array_equal(batch[f], gallery[f])
    # The cache holds the gallery fields only: the conv5 map they come from is not storable.
    assert set(engine.codec.spec) == set(engine.gallery_fields)
    with pytest.raises(ValueError, match="unknown field 'maps'"):
        engine.codec.encode({**items[0], "maps": maps[0]})
    assert engine.codec.decode([])["joint"].shape == (0, 64, 8, 4)

    with pytest.raises(ValueError, match="bytes, expected"):
        engine.codec.decode([{**blobs[0], "joint": blobs[0]["joint"][:-2]}])
    with pytest.raises(ValueError, match="item 1"):
        engine.codec.decode([blobs[0], {"embedding": blobs[1]["embedding"]}])
    with pytest.raises(ValueError, match="unknown"):
        engine.codec.decode([{**blobs[0], "extra": b""}])
    nan = np.frombuffer(blobs[2]["embedding"], np.float32).copy()
    nan[5] = np.nan
    with pytest.raises(ValueError, match="item 1.*non-finite"):
        engine.codec.decode([blobs[0], {**blobs[2], "embedding": nan.tobytes()}])
    with pytest.raises(ValueError, match="unknown field"):
        engine.codec.encode({"other": maps[0]})
    with pytest.raises(ValueError, match="shape"):
        engine.codec.encode({"joint": gallery["joint"][:1]})  # a batch, not one item


def test_float16_cache_changes_scores_little(small):
    f32 = Engine(small[1], providers=CPU_ONLY)
    f16 = Engine(small[1], providers=CPU_ONLY, cache_dtype="float16")
    assert f16.gallery_spec["joint"] == ((64, 8, 4), "float16")
    assert f16.cache_namespace != f32.cache_namespace
    maps = f32.encode(_images(30, seed=5), "b")
    probe = f32.prepare_probe(maps[:1])
    g32, g16 = f32.prepare_gallery(maps), f16.prepare_gallery(maps)
    assert g16["joint"].dtype == np.float16
    item = {f: v[0] for f, v in g16.items()}
    blob = f16.codec.encode(item)
    assert len(blob["joint"]) == 64 * 8 * 4 * 2  # half the float32 bytes
    with pytest.raises(ValueError, match="bytes, expected"):
        f32.codec.decode([blob])  # float16 bytes are not read as float32
    blobs16 = [f16.codec.encode({f: v[k] for f, v in g16.items()}) for k in range(30)]
    scores16 = f16.score(probe, f16.codec.decode(blobs16))
    diff = np.abs(scores16 - f32.score(probe, g32)).max()
    assert 0 < diff < 1e-3


def test_float16_cache_keeps_the_top10_on_real_images(tmp_path, cuhk03_val):
    net = _calibrated("dsmi-small", cuhk03_val)
    export_model(net, tmp_path / "m")
    f32 = Engine(tmp_path / "m", providers=CPU_ONLY)
    f16 = Engine(tmp_path / "m", providers=CPU_ONLY, cache_dtype="float16")
    images = np.stack([f32.preprocess(r.path) for r in cuhk03_val])
    maps = f32.encode(images, "b")
    probe = f32.prepare_probe(f32.encode(images[:1], "a"))
    s32 = f32.score(probe, f32.prepare_gallery(maps[1:]))
    s16 = f16.score(probe, f16.prepare_gallery(maps[1:]))
    # Measured 2.2e-5 (dsmi-small, batch-norm-calibrated random weights, scores' std 0.03);
    # the bound leaves a margin of 20.
    assert np.abs(s16 - s32).max() < 5e-4
    assert list(np.argsort(-s16)[:10]) == list(np.argsort(-s32)[:10])


def test_placed_chunks_score_exactly_like_host_batches():
    from service.engine import Engine
    from tests.service_support import exported_model_dir

    engine = Engine(exported_model_dir(), providers=["CPUExecutionProvider"], batch_size=16)
    assert not engine.places_galleries  # on the CPU only when asked
    rng = np.random.default_rng(3)
    gallery = engine.prepare_gallery(np.maximum(rng.normal(size=(45, *engine.map_shape)), 0)
                                     .astype(np.float32))
    probe = engine.prepare_probe(np.maximum(rng.normal(size=(1, *engine.map_shape)), 0)
                                 .astype(np.float32))
    expected = engine.score(probe, gallery)
    whole = engine.place(gallery, 0, 45)
    assert [c["embedding"].shape()[0] for c in whole] == [16, 16, 13]
    np.testing.assert_array_equal(engine.score_placed(probe, whole), expected)
    pieces = engine.place(gallery, 0, 32) + engine.place(gallery, 32, 45)
    np.testing.assert_array_equal(engine.score_placed(probe, pieces), expected)
    half = {f: a.astype(np.float16) for f, a in gallery.items()}  # a float16 cache
    np.testing.assert_allclose(engine.score_placed(probe, engine.place(half, 0, 45)),
                               engine.score(probe, half), atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        engine.place(gallery, 5, 45)
    assert engine.score_placed(probe, []).shape == (0,)
