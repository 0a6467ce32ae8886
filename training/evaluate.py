"""``dsmi evaluate``: CMC / mAP of a checkpoint or a non-learned baseline on a re-id test set.

Protocols (the paper's Section 4, plus the usual full-gallery figures):

- two-camera data (a manifest split, VIPeR, CUHK03 from its .mat): camera-1 images are the
  queries, camera-2 images the gallery; ``single-shot``: one gallery image per identity drawn at
  random, ``--trials`` times (seeded), averaged; ``all-gallery``: every camera-2 image, once.
  VIPeR is first split into random 316/316 halves (``--split-seed``/``--viper-seed``) and the
  test half evaluated; CUHK03 (.mat) uses the random 1160/100/100 split (``--split test`` or
  ``val``) or one of the 20 official test sets (``--cuhk03-protocol official``).
- Market-1501 and CUHK03's 767/700 protocol: the official query and gallery; ``all-gallery``
  CMC and mAP as in the official code, and ``single-shot`` keeping every distractor (pid 0).

Library use (the trainer, experiment scripts): :func:`evaluate_distances` turns a distance
matrix into the report dict; :func:`plot_cmc` and :func:`plot_ranked` draw the figures;
:func:`load_eval_data` applies a dataset's protocol to get queries and gallery.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibration import cross_camera_pairs, plot_reliability, read_calibration, reliability
from .data.records import ImageRecord, by_split, identities
from .metrics import rank_queries, single_shot

__all__ = ["REPORT_RANKS", "PROTOCOLS", "EvalData", "load_eval_data", "evaluate_distances",
           "summarise", "plot_cmc", "plot_cmc_curves", "plot_ranked", "write_report",
           "format_report", "checkpoint_distances", "evaluate_and_write", "evaluate_run"]

REPORT_RANKS = (1, 5, 10, 20)
PROTOCOLS = ("single-shot", "all-gallery")
DATASETS = ("manifest", "viper", "cuhk03", "market1501")


# --- metrics -> report ---------------------------------------------------------------------

def _ids(records: Sequence[ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray([r.pid for r in records], dtype=np.int64),
            np.asarray([r.camid for r in records], dtype=np.int64))


def _figures(cmc: np.ndarray, mean_ap: float) -> dict:
    out = {f"rank{k}": float(cmc[k - 1]) for k in REPORT_RANKS if k <= len(cmc)}
    out["mAP"] = float(mean_ap)
    out["cmc"] = [float(v) for v in cmc]
    return out


def evaluate_distances(distmat: np.ndarray, queries: Sequence[ImageRecord],
                       gallery: Sequence[ImageRecord], *, trials: int = 10, seed: int = 0,
                       max_rank: int = 20, protocols: Sequence[str] = PROTOCOLS,
                       keep_pids: Sequence[int] = (), meta: dict | None = None) -> dict:
    """A ``(Q, G)`` distance matrix -> the report dict (JSON-ready).

    ``results`` holds one entry per protocol (``single-shot``: ``trials`` seeded draws of one
    gallery image per identity, ``keep_pids`` always kept; ``all-gallery``: the whole gallery),
    each with its rank-1/5/10/20, mAP and CMC (fractions in [0, 1]), trial count and seed.
    ``meta`` (dataset, split, model, ...) is copied into the report.
    """
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; known: {PROTOCOLS}")
    distmat = np.asarray(distmat)
    if distmat.shape != (len(queries), len(gallery)):
        raise ValueError(f"distance matrix {distmat.shape} does not match {len(queries)} "
                         f"queries x {len(gallery)} gallery items")
    q_pids, q_cams = _ids(queries)
    g_pids, g_cams = _ids(gallery)
    results = []
    for protocol in protocols:
        if protocol == "single-shot":
            ss = single_shot(distmat, q_pids, g_pids, q_cams, g_cams, trials=trials, seed=seed,
                             max_rank=max_rank, keep_pids=keep_pids)
            gallery_ids = len(set(g_pids.tolist()) - set(keep_pids))
            kept = int(np.isin(g_pids, list(keep_pids)).sum())
            results.append({
                "protocol": protocol, "trials": ss.trials, "seed": seed,
                "gallery_size": gallery_ids + kept,
                "num_valid_queries": float(ss.trial_valid_queries.mean()),
                **_figures(ss.cmc, ss.mean_ap),
                "per_trial": {"rank1": ss.trial_cmc[:, 0].tolist(),
                              "mAP": ss.trial_map.tolist(),
                              "num_valid_queries": ss.trial_valid_queries.tolist()},
            })
        else:
            ranking = rank_queries(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)
            results.append({
                "protocol": protocol, "trials": 1, "seed": None, "gallery_size": len(gallery),
                "num_valid_queries": ranking.num_valid_queries,
                **_figures(ranking.cmc, ranking.mean_ap),
            })
    return {
        **(meta or {}),
        "num_queries": len(queries), "num_gallery": len(gallery),
        "num_query_ids": len(identities(queries)), "num_gallery_ids": len(identities(gallery)),
        "max_rank": int(max_rank),
        "units": "fractions in [0, 1]",
        "results": results,
    }


def format_report(report: dict) -> str:
    """A short text table of the report's figures (percent)."""
    head = f"{'protocol':<12} {'trials':>6} " + " ".join(
        f"{'R' + str(k):>6}" for k in REPORT_RANKS) + f" {'mAP':>6}"
    lines = [f"{report.get('dataset', '?')} / {report.get('split', '?')}: "
             f"{report['num_queries']} queries, {report['num_gallery']} gallery images "
             f"({report['num_gallery_ids']} identities)", head]
    for res in report["results"]:
        ranks = " ".join(f"{100 * res[f'rank{k}']:6.2f}" if f"rank{k}" in res else f"{'-':>6}"
                         for k in REPORT_RANKS)
        lines.append(f"{res['protocol']:<12} {res['trials']:>6} {ranks} "
                     f"{100 * res['mAP']:6.2f}")
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------

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
    q_pids, q_cams = _ids(queries)
    g_pids, g_cams = _ids(gallery)
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


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


# --- datasets and their protocols ----------------------------------------------------------

@dataclass
class EvalData:
    """Queries and gallery of one test set, and how they were obtained."""

    queries: list[ImageRecord]
    gallery: list[ImageRecord]
    dataset: str
    split: str
    protocol: str                      # how queries/gallery were formed, in words
    keep_pids: tuple[int, ...] = ()    # gallery pids kept whole in single-shot draws
    details: dict = field(default_factory=dict)


def _two_camera(records, dataset, split, protocol, **details) -> EvalData:
    from .data.splits import query_gallery

    queries, gallery = query_gallery(records)
    return EvalData(queries, gallery, dataset, split,
                    protocol + "; camera-1 queries vs camera-2 gallery", details=details)


def load_eval_data(data: str | Path, dataset: str | None = None, split: str | None = None,
                   split_seed: int = 0, cuhk03_boxes: str = "labeled",
                   cuhk03_protocol: str = "random", cuhk03_testset: int = 1,
                   progress: bool = False) -> EvalData:
    """Read ``data`` (a manifest CSV or an official-layout root) and apply ``dataset``'s
    protocol -> :class:`EvalData`. See the module docstring for the protocols."""
    from .data.manifest import read_manifest
    from .data.splits import cuhk03_official_split, cuhk03_split, viper_split

    data = Path(data)
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if not data.exists():
        raise FileNotFoundError(f"--data not found: {data}")
    if data.is_file() and data.suffix.lower() == ".csv":
        records = read_manifest(data)
        if dataset == "viper":
            _, test = viper_split(records, split_seed)
            return _two_camera(test, "viper", "test", f"VIPeR manifest, random 316/316 split "
                               f"(seed {split_seed}), test half", split_seed=split_seed)
        split = split or "val"
        chosen = by_split(records, split)
        if not chosen:
            splits = sorted({r.split for r in records})
            hint = " (a VIPeR manifest? add --dataset viper)" if splits == ["all"] else ""
            raise ValueError(f"{data} has no split {split!r}; it has {splits}{hint}")
        return _two_camera(chosen, dataset or "manifest", split,
                           f"manifest {data.name}, split {split}")
    if dataset is None or dataset == "manifest":
        raise ValueError(f"{data} is not a manifest CSV: name the official layout with "
                         f"--dataset viper|cuhk03|market1501")
    if dataset == "viper":
        from .data.viper import read_viper

        _, test = viper_split(read_viper(data), split_seed)
        return _two_camera(test, "viper", "test", f"VIPeR, random 316/316 split (seed "
                           f"{split_seed}), test half", split_seed=split_seed)
    if dataset == "market1501":
        from .data.market1501 import read_market1501

        records = read_market1501(data, splits=("query", "gallery"))
        return EvalData(by_split(records, "query"), by_split(records, "gallery"), "market1501",
                        "query/gallery", "Market-1501 official query and gallery "
                        "(junk dropped, distractors kept)", keep_pids=(0,))
    from .data import cuhk03 as cuhk03_data

    name = f"cuhk03-{cuhk03_boxes}"
    if cuhk03_protocol == "new":
        records = cuhk03_data.read_cuhk03_new_protocol(data, cuhk03_boxes, progress=progress)
        return EvalData(by_split(records, "query"), by_split(records, "gallery"), name,
                        "query/gallery", "CUHK03 767/700 protocol, official query and gallery")
    records = cuhk03_data.read_cuhk03(data, cuhk03_boxes, progress=progress)
    if cuhk03_protocol == "official":
        _, test = cuhk03_official_split(records, cuhk03_data.cuhk03_testsets(data),
                                        cuhk03_testset)
        return _two_camera(test, name, f"testset-{cuhk03_testset}",
                           f"CUHK03 official test set {cuhk03_testset} of 20",
                           testset=cuhk03_testset)
    if cuhk03_protocol != "random":
        raise ValueError(f"unknown CUHK03 protocol {cuhk03_protocol!r}; "
                         "known: random, official, new")
    split = split or "test"
    train, val, test = cuhk03_split(records, split_seed)
    parts = {"train": train, "val": val, "test": test}
    if split not in parts:
        raise ValueError(f"CUHK03 random split has no part {split!r}; use val or test")
    return _two_camera(parts[split], name, split, f"CUHK03, random 1160/100/100 split "
                       f"(seed {split_seed}), {split} part", split_seed=split_seed)


# --- the command ---------------------------------------------------------------------------


def checkpoint_distances(checkpoint: str | Path, queries: Sequence[ImageRecord],
                         gallery: Sequence[ImageRecord], device: str = "cpu",
                         batch_size: int = 64, pair_batch: int = 4096, num_workers: int = 0,
                         progress: bool = False, embedding_only: bool = False
                         ) -> tuple[np.ndarray, dict]:
    """Load a checkpoint and compute its ``(Q, G)`` distances -> ``(distances, model info)``.
    ``embedding_only``: see :func:`training.inference.distance_matrix`."""
    import torch

    from model.checkpoint import load_checkpoint

    from .inference import distance_matrix

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device}: CUDA is not available here")
    net, payload = load_checkpoint(checkpoint, map_location="cpu")
    net.to(device)
    dist = distance_matrix(net, queries, gallery, batch_size=batch_size, pair_batch=pair_batch,
                           device=device, num_workers=num_workers, progress=progress,
                           embedding_only=embedding_only)
    name = f"{net.variant} (embedding only)" if embedding_only else net.variant
    info = {"kind": "checkpoint", "name": name, "variant": net.variant,
            "embedding_only": embedding_only,
            "checkpoint": str(Path(checkpoint).resolve()), "input_size": list(net.input_size),
            "epoch": payload.get("epoch")}
    return dist, info


def summarise(report: dict) -> dict:
    """``{protocol: {rank1, rank5, rank10, rank20, mAP}}`` of a report (fractions)."""
    keys = [f"rank{k}" for k in REPORT_RANKS] + ["mAP"]
    return {res["protocol"]: {k: res[k] for k in keys if k in res} for res in report["results"]}


def evaluate_and_write(distmat: np.ndarray, queries: Sequence[ImageRecord],
                       gallery: Sequence[ImageRecord], out: str | Path, *, meta: dict,
                       trials: int = 10, seed: int = 0, max_rank: int = 20,
                       keep_pids: Sequence[int] = (), ranked_queries: int = 6,
                       save_distances: bool = False) -> dict:
    """:func:`evaluate_distances`, then ``report.json``, ``cmc.png``, ``ranked.png`` (and
    ``distances.npz`` if asked) in ``out`` -> the report (with a ``summary``)."""
    started = time.perf_counter()
    report = evaluate_distances(distmat, queries, gallery, trials=trials, seed=seed,
                                max_rank=max_rank, keep_pids=keep_pids, meta=meta)
    report["summary"] = summarise(report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_cmc(report, out / "cmc.png")
    plot_ranked(distmat, queries, gallery, out / "ranked.png", num_queries=ranked_queries,
                seed=seed)
    if save_distances:
        q_pids, q_cams = _ids(queries)
        g_pids, g_cams = _ids(gallery)
        np.savez_compressed(out / "distances.npz", distances=np.asarray(distmat),
                            query_pids=q_pids, query_camids=q_cams, gallery_pids=g_pids,
                            gallery_camids=g_cams,
                            query_paths=np.asarray([str(r.path) for r in queries]),
                            gallery_paths=np.asarray([str(r.path) for r in gallery]))
    timing = dict(report.get("timing_s") or {})
    timing["metrics_and_figures"] = round(time.perf_counter() - started, 3)
    report["timing_s"] = timing
    write_report(report, out / "report.json")
    return report


def evaluate_run(checkpoint: str | Path, data, out: str | Path, *, device: str = "cpu",
                 trials: int = 10, seed: int = 0, max_rank: int = 20, batch_size: int = 64,
                 progress: bool = False, ranked_queries: int = 6) -> dict:
    """Evaluate ``checkpoint`` on the test set of ``data`` and write the report to ``out``.

    ``data``: an :class:`EvalData`, or the trainer's ``DataSplits`` (its ``test_queries``,
    ``test_gallery``, ``protocol``, ``keep_pids`` and ``info`` are used).
    """
    if isinstance(data, EvalData):
        queries, gallery, keep = data.queries, data.gallery, data.keep_pids
        meta = {"dataset": data.dataset, "split": data.split, "query_gallery": data.protocol,
                **data.details}
    else:
        queries, gallery = data.test_queries, data.test_gallery
        keep = tuple(getattr(data, "keep_pids", ()))
        meta = {"dataset": getattr(data, "protocol", None), "split": "test",
                "data_info": dict(getattr(data, "info", {}) or {})}
    t0 = time.perf_counter()
    dist, model_info = checkpoint_distances(checkpoint, queries, gallery, device=device,
                                            batch_size=batch_size, progress=progress)
    meta = {**meta, "model": model_info,
            "timing_s": {"distances": round(time.perf_counter() - t0, 3)}}
    report = evaluate_and_write(dist, queries, gallery, out, meta=meta, trials=trials,
                                seed=seed, max_rank=max_rank, keep_pids=keep,
                                ranked_queries=ranked_queries)
    calibration = read_calibration(checkpoint)
    if calibration is not None:
        # How well the held-out fit's probabilities hold on this test set.
        (q_pids, q_cams), (g_pids, g_cams) = _ids(queries), _ids(gallery)
        scores, same = cross_camera_pairs(dist, q_pids, g_pids, q_cams, g_cams)
        table = reliability(calibration.probability(scores), same)
        report["calibration"] = {**calibration.to_dict(), **table}
        plot_reliability(table, Path(out) / "reliability.png")
        write_report(report, Path(out) / "report.json")
    return report
