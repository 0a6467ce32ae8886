"""``dsmi evaluate`` end to end on tiny generated data, and its library functions."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dsmi_cli.main import main
from training.data import ImageRecord
from training.evaluate import evaluate_run, load_eval_data
from training.metrics import evaluate_ranking, single_shot
from training.plots import plot_ranked
from training.report import evaluate_distances

COLOURS = [(200, 40, 40), (40, 40, 200), (40, 170, 60), (220, 200, 50), (150, 60, 180),
           (240, 140, 30), (90, 90, 90), (30, 180, 190)]


def person_image(pid, k, size=(64, 128)):
    """Identity ``pid``: its own shirt and trousers colours; ``k`` varies the noise."""
    w, h = size
    rng = np.random.default_rng(1000 * pid + k)
    img = np.empty((h, w, 3))
    img[: h // 2] = COLOURS[pid % len(COLOURS)]
    img[h // 2:] = COLOURS[(pid + 3) % len(COLOURS)]
    img += rng.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture()
def manifest(tmp_path):
    """6 val identities x 2 cameras x 2 images, and 2 train identities, like the shared
    CUHK03 manifest (paths relative to the CSV)."""
    rows = []
    for split, pids in (("train", (0, 1)), ("val", range(100, 106))):
        for pid in pids:
            for cam in (1, 2):
                for k in range(2):
                    rel = f"images/{split}/{pid:04d}_{cam}{k}.png"
                    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                    person_image(pid, 10 * cam + k).save(tmp_path / rel)
                    rows.append((rel, pid, cam, split))
    path = tmp_path / "tiny.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "pid", "camid", "split"])
        writer.writerows(rows)
    return path


def check_outputs(out, trials=3):
    report = json.loads((out / "report.json").read_text())
    protocols = {r["protocol"]: r for r in report["results"]}
    assert set(protocols) == {"single-shot", "all-gallery"}
    assert protocols["single-shot"]["trials"] == trials
    assert protocols["single-shot"]["seed"] == 0
    assert protocols["all-gallery"]["trials"] == 1
    for res in report["results"]:
        cmc = np.asarray(res["cmc"])
        assert cmc.shape == (20,) and np.all(np.diff(cmc) >= 0)
        assert [res[f"rank{k}"] for k in (1, 5, 10, 20)] == [cmc[0], cmc[4], cmc[9], cmc[19]]
        assert 0 < res["mAP"] <= 1 and cmc[-1] == 1.0  # 6 identities: all found by rank 20
    for name, (min_w, min_h) in {"cmc.png": (300, 200), "ranked.png": (600, 300)}.items():
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            assert img.width >= min_w and img.height >= min_h
            img.load()
    return report, protocols


def test_evaluate_a_checkpoint(tmp_path, manifest):
    from model import build_model
    from model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "small.pt", build_model("dsmi-small"), epoch=3)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(manifest), "--split", "val",
               "--out", str(out), "--trials", "3", "--no-progress", "--ranked-queries", "4"])
    assert rc == 0
    report, protocols = check_outputs(out)
    assert report["dataset"] == "manifest" and report["split"] == "val"
    assert report["model"]["kind"] == "checkpoint"
    assert report["model"]["variant"] == "dsmi-small" and report["model"]["epoch"] == 3
    assert report["model"]["checkpoint"] == str(ckpt.resolve())
    assert (report["num_queries"], report["num_gallery"]) == (12, 12)
    assert report["num_query_ids"] == report["num_gallery_ids"] == 6
    assert protocols["single-shot"]["gallery_size"] == 6
    assert protocols["all-gallery"]["gallery_size"] == 12
    with Image.open(out / "ranked.png") as img:
        assert img.height < 4 * 150  # four query rows of 128-pixel thumbnails
    assert report["summary"]["single-shot"]["rank1"] == protocols["single-shot"]["rank1"]

    # The trainer's entry point: the same checkpoint on the same test set, same figures.
    data = load_eval_data(manifest, split="val")
    splits = SimpleNamespace(test_queries=data.queries, test_gallery=data.gallery,
                             protocol="manifest", keep_pids=(), info={"note": "x"})
    again = evaluate_run(ckpt, splits, tmp_path / "again", trials=3)
    assert [r["cmc"] for r in again["results"]] == [r["cmc"] for r in report["results"]]
    assert again["data_info"] == {"note": "x"} and (tmp_path / "again" / "cmc.png").is_file()


def test_embedding_only_drops_the_pair_head(tmp_path, manifest):
    """``--embedding-only`` scores by cos(FC(g_A), FC(g_B)): the same as the full network when
    its head gives F~ = 0 (last projection zeroed), different when the head is live."""
    import torch

    from model import build_model
    from model.checkpoint import save_checkpoint
    from training.evaluator import distance_matrix

    data = load_eval_data(manifest, split="val")
    torch.manual_seed(0)
    net = build_model("dsmi-small", dropout=0.0)
    with torch.no_grad():  # a live head: F~ large enough to move the scores
        net.pooling.out_proj.weight.mul_(50)
    full = distance_matrix(net, data.queries, data.gallery)
    alone = distance_matrix(net, data.queries, data.gallery, embedding_only=True)
    assert alone.shape == full.shape == (12, 12)
    assert np.abs(full - alone).max() > 1e-3
    with torch.no_grad():
        net.pooling.out_proj.weight.zero_()
        net.pooling.out_proj.bias.zero_()
    np.testing.assert_allclose(distance_matrix(net, data.queries, data.gallery), alone,
                               atol=1e-5)

    ckpt = save_checkpoint(tmp_path / "small.pt", net, epoch=1)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--embedding-only", "--data",
                 str(manifest), "--split", "val", "--out", str(out), "--trials", "2",
                 "--no-progress", "--save-distances"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["embedding_only"] is True
    assert report["model"]["name"] == "dsmi-small (embedding only)"
    np.testing.assert_allclose(np.load(out / "distances.npz")["distances"], alone, atol=1e-5)
    assert main(["evaluate", "--baseline", "pixels", "--embedding-only", "--data",
                 str(manifest), "--out", str(tmp_path / "x"), "--no-progress"]) == 2


def test_evaluate_a_baseline(tmp_path, manifest):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--baseline", "histogram", "--data", str(manifest),
               "--out", str(out), "--trials", "3", "--no-progress", "--save-distances"])
    assert rc == 0
    report, protocols = check_outputs(out)
    assert report["model"] == {"kind": "baseline", "name": "histogram", "variant": None,
                               "checkpoint": None}
    # Each identity has its own colours: the histograms match every query at rank 1.
    assert protocols["single-shot"]["rank1"] == 1.0
    saved = np.load(out / "distances.npz")
    assert saved["distances"].shape == (12, 12)
    cmc, mean_ap = evaluate_ranking(saved["distances"], saved["query_pids"],
                                    saved["gallery_pids"], saved["query_camids"],
                                    saved["gallery_camids"])
    assert protocols["all-gallery"]["mAP"] == pytest.approx(mean_ap)


def test_evaluate_viper_official_layout(tmp_path):
    for pid in range(8):
        for cam, folder in ((1, "cam_a"), (2, "cam_b")):
            (tmp_path / "VIPeR" / folder).mkdir(parents=True, exist_ok=True)
            person_image(pid, cam).save(tmp_path / "VIPeR" / folder / f"{pid:03d}_0.bmp")
    reports = []
    for seed in (1, 1, 2):
        out = tmp_path / f"eval{len(reports)}"
        assert main(["evaluate", "--baseline", "pixels", "--data", str(tmp_path), "--dataset",
                     "viper", "--viper-seed", str(seed), "--out", str(out), "--trials", "2",
                     "--no-progress"]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    assert reports[0]["num_queries"] == reports[0]["num_gallery"] == 4  # the test half
    assert reports[0]["split_seed"] == 1 and reports[0]["dataset"] == "viper"
    assert reports[0]["results"] == reports[1]["results"]
    assert reports[0]["options"]["split_seed"] == 1


def test_evaluate_errors_are_clear(tmp_path, manifest, capsys):
    assert main(["evaluate", "--baseline", "pixels", "--data", str(manifest), "--split", "test",
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "no split 'test'" in capsys.readouterr().err
    assert main(["evaluate", "--baseline", "pixels", "--data", str(tmp_path), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data",
                 str(manifest), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a model is required
        main(["evaluate", "--data", str(manifest), "--out", str(tmp_path / "x")])


def test_evaluate_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--baseline", "--data", "--dataset", "--split",
                   "--viper-seed", "--trials", "--device", "--out"):
        assert option in text


def test_evaluate_distances_matches_the_metrics():
    rng = np.random.default_rng(0)
    queries = [ImageRecord(f"/q{i}.png", i % 5, 1) for i in range(10)]
    gallery = [ImageRecord(f"/g{i}.png", i % 5, 2) for i in range(15)]
    dist = rng.random((10, 15))
    report = evaluate_distances(dist, queries, gallery, trials=4, seed=9, max_rank=10,
                                meta={"dataset": "toy", "split": "test"})
    single, full = report["results"]
    ss = single_shot(dist, [q.pid for q in queries], [g.pid for g in gallery], [1] * 10,
                     [2] * 15, trials=4, seed=9, max_rank=10)
    assert single["protocol"] == "single-shot" and single["trials"] == 4
    np.testing.assert_allclose(single["cmc"], ss.cmc)
    assert single["mAP"] == pytest.approx(ss.mean_ap)
    cmc, mean_ap = evaluate_ranking(dist, [q.pid for q in queries], [g.pid for g in gallery],
                                    [1] * 10, [2] * 15, max_rank=10)
    np.testing.assert_allclose(full["cmc"], cmc)
    assert "rank20" not in full and full["rank10"] == cmc[9]
    assert report["dataset"] == "toy" and report["num_gallery_ids"] == 5
    with pytest.raises(ValueError, match="does not match"):
        evaluate_distances(dist[:, :3], queries, gallery)


def test_plot_ranked_frames(tmp_path):
    # Query pid 0 (cam 1); gallery: pid 0 cam 1 (same camera: left out), pid 1, pid 0 cam 2.
    paths = []
    for i, colour in enumerate([(250, 250, 250), (0, 0, 0), (0, 0, 0), (0, 0, 0)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 128), colour).save(paths[-1])
    queries = [ImageRecord(paths[0], 0, 1)]
    gallery = [ImageRecord(paths[1], 0, 1), ImageRecord(paths[2], 1, 2),
               ImageRecord(paths[3], 0, 2)]
    out = plot_ranked(np.array([[0.0, 0.1, 0.2]]), queries, gallery, tmp_path / "r.png",
                      top=3)
    with Image.open(out) as img:
        arr = np.asarray(img.convert("RGB")).astype(int)
    row = arr[6]  # through the frames' top border: pad 4 + 2 px into the 4 px border
    cells = [x for x in range(1, arr.shape[1]) if (row[x] != 255).any() and
             (row[x - 1] == 255).all()]
    colours = [tuple(row[x + 1]) for x in cells]
    assert colours[0] == (40, 90, 220)          # the query
    assert colours[1] == (210, 40, 40)          # pid 1: wrong
    assert colours[2] == (30, 170, 60)          # pid 0 camera 2: right
    assert len(colours) == 3                    # the same-camera image is not shown


def test_load_eval_data_market1501_keeps_distractors(tmp_path):
    from tests.training.test_data_readers import make_market

    data = load_eval_data(make_market(tmp_path), "market1501")
    assert (len(data.queries), len(data.gallery)) == (2, 5) and data.keep_pids == (0,)
    dist = np.random.default_rng(0).random((2, 5))
    single = evaluate_distances(dist, data.queries, data.gallery, trials=2,
                                keep_pids=data.keep_pids)["results"][0]
    assert single["gallery_size"] == 4  # one image of pids 3 and 4, both distractors


def test_load_eval_data_cuhk03_protocols(tmp_path):
    from tests.training.test_data_readers import make_cuhk03_mat

    make_cuhk03_mat(tmp_path / "cuhk-03.mat")
    data = load_eval_data(tmp_path, "cuhk03", cuhk03_protocol="official", cuhk03_testset=2)
    assert {r.pid for r in data.queries} == {2, 3} and {r.camid for r in data.queries} == {1}
    assert {r.camid for r in data.gallery} == {2} and data.split == "testset-2"
    with pytest.raises(ValueError, match="1360"):  # 5 persons: too few for 1160/100/100
        load_eval_data(tmp_path, "cuhk03")
