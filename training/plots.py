"""The evaluation figures: CMC curves, ranked galleries, the reliability diagram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.records import ImageRecord
from .report import record_ids

__all__ = ["plot_cmc_curves", "plot_cmc", "plot_ranked", "plot_reliability",
           "plot_training_curve"]

def plot_cmc_curves(curves: Sequence[tuple[str, Sequence[float], float]], path: str | Path,
                    title: str) -> Path:
    """CMC curves ``(label, cmc fractions for ranks 1..R, mAP)`` in one PNG, in percent; each
    legend entry ends with its rank-1 and mAP."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    max_rank = 1
    for label, cmc, mean_ap in curves:
        cmc = 100 * np.asarray(cmc)
        max_rank = max(max_rank, len(cmc))
        ax.plot(np.arange(1, len(cmc) + 1), cmc, marker="o", markersize=3,
                label=f"{label}: R1 {cmc[0]:.1f}%, mAP {100 * mean_ap:.1f}%")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(1, max_rank)
    ax.set_xticks(np.unique(np.r_[1, np.arange(5, max_rank + 1, 5)]) if max_rank >= 5
                  else np.arange(1, max_rank + 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_cmc(report: dict, path: str | Path, title: str | None = None) -> Path:
    """CMC curves (ranks 1..max_rank, percent) of every protocol in ``report`` -> PNG."""
    curves = [((f"{res['protocol']} ({res['trials']} trials)" if res["trials"] > 1
                else res["protocol"]), res["cmc"], res["mAP"]) for res in report["results"]]
    model = report.get("model", {})
    return plot_cmc_curves(curves, path, title or f"CMC: {model.get('name', '?')} on "
                                                   f"{report.get('dataset', '?')} "
                                                   f"{report.get('split', '')}")


def plot_ranked(distmat: np.ndarray, queries: Sequence[ImageRecord],
                gallery: Sequence[ImageRecord], path: str | Path, num_queries: int = 6,
                top: int = 10, seed: int = 0, thumb: tuple[int, int] = (128, 64)) -> Path:
    """A few queries (left, framed blue) each with its ``top`` gallery images, best first,
    framed green for the query's person and red otherwise -> PNG. Gallery images of the
    query's person and camera are left out, as the metrics leave them out. The queries are
    drawn with ``seed`` among those that have a true match."""
    from PIL import Image, ImageDraw

    from model.preprocess import decode_image

    distmat = np.asarray(distmat)
    q_pids, q_cams = record_ids(queries)
    g_pids, g_cams = record_ids(gallery)
    valid = [q for q in range(len(queries))
             if ((g_pids == q_pids[q]) & (g_cams != q_cams[q])).any()]
    pool = valid or list(range(len(queries)))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(pool, size=min(num_queries, len(pool)), replace=False).tolist())
    th, tw = thumb
    border, gap, pad = 4, 16, 4
    cell_w, cell_h = tw + 2 * border, th + 2 * border
    width = pad + cell_w + gap + top * (cell_w + pad)
    height = pad + len(chosen) * (cell_h + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def paste(record: ImageRecord, x: int, y: int, color: tuple[int, int, int]) -> None:
        draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=color)
        canvas.paste(decode_image(record.path).resize((tw, th)), (x + border, y + border))

    for row, q in enumerate(chosen):
        y = pad + row * (cell_h + pad)
        paste(queries[q], pad, y, (40, 90, 220))
        order = np.argsort(distmat[q], kind="stable")
        order = order[~((g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q]))][:top]
        for k, g in enumerate(order):
            x = pad + cell_w + gap + k * (cell_w + pad)
            paste(gallery[g], x, y, (30, 170, 60) if g_pids[g] == q_pids[q] else (210, 40, 40))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def plot_reliability(table: dict, path, title: str = "") -> None:
    """A reliability diagram: per bin, observed share of same-person pairs against the
    predicted probability, with the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["bins"] if r["weight"]]
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    ax.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["observed"] for r in rows],
           width=[0.9 * (r["high"] - r["low"]) for r in rows], color="#4c72b0", alpha=0.8,
           label="observed (even prior)")
    ax.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "o", color="#dd8452",
            label="bin mean")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability (same person)",
           ylabel="share of same-person pairs",
           title=title or f"Reliability, ECE {100 * table['ece']:.2f}%")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training_curve(log_path, path, title: str = "") -> Path:
    """Held-out rank-1 and mAP against training minutes, from a run's ``log.jsonl``, with the
    phase switch marked."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    validated = [r for r in records if "val_map" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for key, label in (("val_rank1", "held-out rank-1"), ("val_map", "held-out mAP")):
        ax.plot([r["elapsed_min"] for r in validated], [100 * r[key] for r in validated],
                marker="o", ms=3, label=label)
    switch = next((r["elapsed_min"] for r, nxt in zip(records, records[1:], strict=False)
                   if r["phase"] != nxt["phase"]), None)
    if switch is not None:
        ax.axvline(switch, color="0.5", ls="--", lw=1)
        ax.text(switch, 2, " phase 2", color="0.4", fontsize=8)
    ax.set(xlabel="training minutes", ylabel="%", ylim=(0, 100),
           title=title or "Validation on identities held out of training")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
