"""dsmi repeat (several seeded splits, averaged) and dsmi table."""

import json

import numpy as np
import pytest

from dsmi_cli.main import main
from training.experiment import aggregate_reports
from training.table import format_table, load_figures


def _report(r1, m):
    return {"results": [{"protocol": "single-shot", "trials": 10, "rank1": r1, "rank5": r1,
                         "rank10": r1, "rank20": r1, "mAP": m}]}


def test_aggregate_gives_mean_and_sample_std():
    agg = aggregate_reports([_report(0.2, 0.3), _report(0.4, 0.5)])
    assert agg["rank1"] == pytest.approx(0.3) and agg["mAP"] == pytest.approx(0.4)
    assert agg["rank1_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert agg["splits"] == 2 and agg["trials_per_split"] == 10


def test_repeat_a_baseline_and_training_over_splits(tiny_manifest, tmp_path, capsys):
    common = ["--config", "configs/cpu.yaml", "--splits", "2", "--no-progress",
              "--set", f"data.root={tiny_manifest.parent}", "--set", "data.manifest=tiny.csv",
              "--set", "data.protocol=viper", "--set", "data.val_ids=2",
              "--set", "train.batch_size=8", "--set", "train.epochs=1",
              "--set", "train.max_minutes=null", "--set", "train.threads=1",
              "--set", "train.pretrain_epochs=0", "--set", "train.eval_every=1"]
    assert main(["repeat", "--out", str(tmp_path / "hist"), "--baseline", "histogram",
                 *common]) == 0
    summary = json.loads((tmp_path / "hist" / "summary.json").read_text())
    assert summary["splits"] == 2 and len(summary["per_split"]) == 2
    per_split = [s["single-shot"]["rank1"] for s in summary["per_split"]]
    assert summary["mean"]["single-shot"]["rank1"] == pytest.approx(np.mean(per_split))
    # the two splits test different people
    tests = [json.loads((tmp_path / "hist" / f"split-{k}" / "eval" / "report.json").read_text())
             for k in range(2)]
    assert all(t["num_query_ids"] == 8 for t in tests)
    assert main(["repeat", "--out", str(tmp_path / "dsmi"), *common]) == 0
    assert (tmp_path / "dsmi" / "split-1" / "best.pt").is_file()
    capsys.readouterr()
    assert main(["table", str(tmp_path / "hist"), str(tmp_path / "dsmi" / "split-0"),
                 "--markdown"]) == 0
    table = capsys.readouterr().out
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| hist |")
    assert lines[3].startswith("| split-0 |")
    # the repeat's mean CMC curve is kept, and both runs' curves go into one plot
    mean_cmc = summary["mean"]["single-shot"]["cmc"]
    split_cmcs = [next(r for r in t["results"] if r["protocol"] == "single-shot")["cmc"]
                  for t in tests]
    assert mean_cmc == pytest.approx(np.mean(split_cmcs, axis=0).tolist())
    png = tmp_path / "cmc.png"
    assert main(["table", str(tmp_path / "hist"), str(tmp_path / "dsmi" / "split-0"),
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_formats_std_and_missing_reports(tmp_path):
    text = format_table([("a", {"rank1": 0.5, "rank5": 0.6, "rank10": 0.7, "rank20": 0.8,
                                "mAP": 0.4, "rank1_std": 0.01, "splits": 10,
                                "trials_per_split": 10})])
    assert "50.00 ± 1.00" in text and "10 x 10" in text
    with pytest.raises(FileNotFoundError):
        load_figures(tmp_path)


def test_table_plot_refuses_reports_without_curves(tmp_path, capsys):
    (tmp_path / "report.json").write_text(json.dumps(_report(0.2, 0.3)))
    assert main(["table", str(tmp_path / "report.json"), "--plot",
                 str(tmp_path / "cmc.png")]) == 2
    assert "no CMC curve" in capsys.readouterr().err
    assert not (tmp_path / "cmc.png").exists()
