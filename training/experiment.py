"""``dsmi repeat``: one config trained and evaluated on several seeded splits (VIPeR's 10
random 316/316 splits) -- or a non-learned baseline evaluated on the same splits -- with the
figures averaged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["FIGURES", "aggregate_reports", "repeat"]

FIGURES = ("rank1", "rank5", "rank10", "rank20", "mAP")


def aggregate_reports(reports: list[dict], protocol: str = "single-shot") -> dict:
    """Mean and standard deviation of each figure of ``protocol`` over several reports."""
    rows = [next(r for r in rep["results"] if r["protocol"] == protocol) for rep in reports]
    out = {"protocol": protocol, "splits": len(rows),
           "trials_per_split": rows[0].get("trials")}
    for key in FIGURES:
        values = np.asarray([row[key] for row in rows], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    if all("cmc" in row for row in rows):  # the mean curve, for dsmi table --plot
        out["cmc"] = np.mean([row["cmc"] for row in rows], axis=0).tolist()
    return out


def repeat(config: str | Path | None, overrides: list[str], out: str | Path, splits: int,
           baseline: str | None = None, progress: bool = True) -> dict:
    """Run ``splits`` experiments with ``data.split_seed`` = 0..splits-1 into ``out/split-K``;
    write ``out/summary.json`` (per-split reports' figures and their mean) and return it."""
    from .config import load_config
    from .evaluate import evaluate_and_write, evaluate_run
    from .protocols import prepare_data

    out = Path(out)
    reports = []
    for seed in range(splits):
        split_dir = out / f"split-{seed}"
        cfg = load_config(config, [*overrides, f"data.split_seed={seed}"])
        if baseline:
            from .baselines import baseline_distance

            data = prepare_data(cfg.data)
            dist = baseline_distance(baseline, data.test_queries, data.test_gallery)
            meta = {"dataset": data.protocol, "split": "test", "data_info": data.info,
                    "model": {"kind": "baseline", "name": baseline}}
            report = evaluate_and_write(dist, data.test_queries, data.test_gallery,
                                        split_dir / "eval", meta=meta, keep_pids=data.keep_pids)
        else:
            from .train import Trainer

            trainer = Trainer(cfg, split_dir, progress=progress)
            summary = trainer.fit()
            report = evaluate_run(split_dir / "best.pt", trainer.data, split_dir / "eval",
                                  device=cfg.train.device, progress=progress)
            report["training"] = summary
        reports.append(report)
        ss = next(r for r in report["results"] if r["protocol"] == "single-shot")
        print(f"split {seed}: rank-1 {100 * ss['rank1']:.2f}  rank-10 {100 * ss['rank10']:.2f}"
              f"  mAP {100 * ss['mAP']:.2f}", flush=True)
    summary = {"name": out.name, "config": str(config), "overrides": overrides,
               "baseline": baseline, "splits": splits,
               "mean": {p: aggregate_reports(reports, p) for p in ("single-shot", "all-gallery")},
               "per_split": [{"split_seed": k, **{p["protocol"]: {f: p[f] for f in FIGURES}
                                                  for p in rep["results"]}}
                             for k, rep in enumerate(reports)]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# -- command line -------------------------------------------------------------------------
