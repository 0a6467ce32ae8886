"""One dataset registry for training, evaluation and the config checks; one evaluator for
validation and ``dsmi evaluate`` that leaves the network's mode as it found it."""

import numpy as np
import pytest
import torch

from model import build_model
from training.config import CHOICES, ConfigError, load_config
from training.data import registry
from training.evaluate import DATASETS, load_eval_data
from training.evaluator import Evaluator, distance_matrix, eval_mode
from training.protocols import prepare_data


def test_config_evaluation_and_training_read_the_same_registry(tiny_manifest, monkeypatch):
    assert CHOICES["data.protocol"] == tuple(registry.DATASETS) == DATASETS
    calls = []
    entry = registry.DATASETS["manifest"]
    monkeypatch.setitem(registry.DATASETS, "manifest", registry.Dataset(
        "manifest", lambda cfg: calls.append("train") or entry.training(cfg),
        lambda path, opts: calls.append("test") or entry.test_set(path, opts)))
    cfg = load_config(None, [f"data.root={tiny_manifest.parent}",
                             f"data.manifest={tiny_manifest.name}", "data.test_split=test",
                             "data.val_ids=3"])
    data = prepare_data(cfg.data)
    test = load_eval_data(tiny_manifest, split="test")
    assert calls == ["train", "test"]
    assert [r.path for r in data.test_queries] == [r.path for r in test.queries]
    with pytest.raises(ConfigError, match="allowed: manifest, viper, cuhk03, market1501"):
        load_config(None, ["data.protocol=duke"])
    with pytest.raises(ValueError, match="unknown dataset 'duke'"):
        load_eval_data(tiny_manifest, "duke")


def test_viper_all_is_every_person_camera_a_against_b(tmp_path):
    import csv

    from PIL import Image
    rows = []
    for pid in range(1, 6):
        for cam in (1, 2):
            name = f"{pid:04d}{cam:04d}.png"
            Image.new("RGB", (48, 128), (pid * 40, cam * 90, 0)).save(tmp_path / name)
            rows.append((name, pid, cam, "all"))
    with (tmp_path / "viper.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "pid", "camid", "split"), *rows])
    data = load_eval_data(tmp_path / "viper.csv", "viper", split="all")
    assert len(data.queries) == len(data.gallery) == 5
    assert {r.camid for r in data.queries} == {1} and {r.camid for r in data.gallery} == {2}


def test_evaluator_restores_the_mode_and_matches_the_records_path(tiny_manifest):
    torch.manual_seed(0)
    net = build_model("dsmi-small", input_size=(64, 32))
    net.train()
    net.trunks.eval()  # a mixed state, as in phase 2 of a BNNeck run
    before = {name: m.training for name, m in net.named_modules()}
    data = load_eval_data(tiny_manifest, split="test")
    evaluator = Evaluator(net)
    evaluator.add_records(data.queries, query=True)
    evaluator.add_records(data.gallery, query=False)
    figures = evaluator.result()
    assert {name: m.training for name, m in net.named_modules()} == before
    assert 0 <= figures["mAP"] <= 1 and len(figures["cmc"]) == 20
    np.testing.assert_allclose(evaluator.distances(),
                               distance_matrix(net, data.queries, data.gallery), atol=1e-6)
    evaluator.reset()
    with pytest.raises(ValueError, match="query and gallery"):
        evaluator.distances()
    with eval_mode(net):
        assert not net.training
    assert net.training
