"""bench/head_bench.py and the benchmarks' "before" model: the old head taken out of git
scores as today's does, and the benchmark runs end to end on a small gallery."""

import json
import subprocess

import numpy as np
import pytest

from bench.common import BEFORE_COMMIT, before_model_dir, small_model_dir
from service.engine import Engine
from tests.conftest import DATA_DIR, ROOT


def _has_before_commit() -> bool:
    probe = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", BEFORE_COMMIT],
                           capture_output=True)
    return probe.returncode == 0


needs_history = pytest.mark.skipif(not _has_before_commit(),
                                   reason=f"commit {BEFORE_COMMIT} not in this checkout")


@needs_history
def test_the_before_model_is_the_bundled_model_with_its_old_head():
    before, small = before_model_dir(), small_model_dir()
    manifest = json.loads((before / "manifest.json").read_text())
    today = json.loads((small / "manifest.json").read_text())
    assert manifest["model_id"] == today["model_id"]
    assert (before / "head.onnx").read_bytes() != (small / "head.onnx").read_bytes()
    old = Engine(before, providers=["cpu"], head_threads=1)
    new = Engine(small, providers=["cpu"])
    rng = np.random.default_rng(0)
    maps = np.maximum(rng.normal(size=(30, *new.map_shape)), 0).astype(np.float32)
    probe, gallery = new.prepare_probe(maps[:1]), new.prepare_gallery(maps)
    np.testing.assert_allclose(old.score(probe, gallery), new.score(probe, gallery), atol=1e-5)


def test_a_given_before_folder_is_used_as_it_is(tmp_path):
    assert before_model_dir(tmp_path) == tmp_path


@needs_history
def test_head_bench_runs_and_writes_its_table(tmp_path, capsys):
    if not (DATA_DIR / "cuhk03-labeled.csv").is_file():
        pytest.skip(f"shared re-id data not found at {DATA_DIR}")
    from bench.head_bench import main

    out = tmp_path / "head.json"
    assert main(["--n", "300", "--rounds", "1", "--real", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["designs"]) == {"before", "serial", "threads"}
    assert result["max_score_difference"] < 1e-5
    assert result["designs"]["before"]["head_batch_size"] == 256
    assert abs(sum(result["profiles"]["today"]["share"].values()) - 1) < 1e-6
    assert "vs before" in capsys.readouterr().out
