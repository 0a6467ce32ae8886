"""The match probability in query results: read from the model's manifest, reported per
result, and the min_probability filter."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.calibration import Calibration
from service.engine import Engine, ModelFolderError
from tests.service.test_api import query, upload
from tests.service_support import exported_model_dir, image_bytes, make_client

CALIBRATION = {"a": 8.0, "b": -6.0, "method": "platt", "pairs": 100, "positives": 10,
               "fitted_on": "test"}


def calibrated_dir(tmp_path, calibration) -> object:
    folder = tmp_path / "model"
    shutil.copytree(exported_model_dir(), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["calibration"] = calibration
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def calibrated_client(tmp_path_factory):
    folder = calibrated_dir(tmp_path_factory.mktemp("calibrated"), CALIBRATION)
    engine = Engine(folder, providers=["CPUExecutionProvider"], batch_size=16)
    app, _ = make_client(engine, "memory")
    with TestClient(app) as c:
        yield c


def test_results_carry_the_calibrated_probability(calibrated_client):
    images = [image_bytes(k) for k in range(6)]
    assert upload(calibrated_client, "g", images).status_code == 201
    body = query(calibrated_client, "g", image_bytes(0), top_k=6).json()
    cal = Calibration(a=8.0, b=-6.0)
    for r in body["results"]:
        assert r["probability"] == pytest.approx(float(cal.probability(r["score"])), abs=1e-6)
    probabilities = [r["probability"] for r in body["results"]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_min_probability_keeps_only_likely_matches_with_their_ranks(calibrated_client):
    images = [image_bytes(k) for k in range(6)]
    upload(calibrated_client, "h", images)
    everything = query(calibrated_client, "h", image_bytes(0), top_k=6).json()["results"]
    cut = float(np.median([r["probability"] for r in everything]))
    kept = query(calibrated_client, "h", image_bytes(0), top_k=6,
                 min_probability=cut).json()["results"]
    assert kept == [r for r in everything if r["probability"] >= cut]
    assert 0 < len(kept) < len(everything)
    r = query(calibrated_client, "h", image_bytes(0), min_probability=1.5)
    assert r.status_code == 422


def test_without_calibration_probability_is_null_and_the_filter_is_refused(client):
    upload(client, "u", [image_bytes(1), image_bytes(2)])
    body = query(client, "u", image_bytes(1)).json()
    assert all(r["probability"] is None for r in body["results"])
    r = query(client, "u", image_bytes(1), min_probability=0.5)
    assert r.status_code == 422 and "calibrat" in r.json()["error"]["message"]


def test_a_malformed_calibration_refuses_the_model_folder(tmp_path):
    folder = calibrated_dir(tmp_path, {"a": -1.0, "b": 0.0})
    with pytest.raises(ModelFolderError, match="calibration a must be positive"):
        Engine(folder, providers=["CPUExecutionProvider"], warmup=False)
