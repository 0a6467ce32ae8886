"""Evaluation reports: a query x gallery distance matrix -> single-shot and all-gallery CMC
and mAP (:func:`evaluate_distances`), a summary, a text table and the JSON file.

Two-camera data: ``single-shot`` draws one gallery image per identity at random, ``trials``
times (seeded), and averages; ``all-gallery`` ranks every gallery image once. Market-1501 and
CUHK03's 767/700 protocol keep every distractor (``keep_pids``) in the single-shot draws.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.records import ImageRecord, identities
from .metrics import rank_queries, single_shot

__all__ = ["REPORT_RANKS", "PROTOCOLS", "evaluate_distances", "summarise", "format_report",
           "write_report", "record_ids"]

REPORT_RANKS = (1, 5, 10, 20)
PROTOCOLS = ("single-shot", "all-gallery")


def record_ids(records: Sequence[ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Person ids and camera ids of records, as int64 arrays."""
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
    q_pids, q_cams = record_ids(queries)
    g_pids, g_cams = record_ids(gallery)
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

def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


def summarise(report: dict) -> dict:
    """``{protocol: {rank1, rank5, rank10, rank20, mAP}}`` of a report (fractions)."""
    keys = [f"rank{k}" for k in REPORT_RANKS] + ["mAP"]
    return {res["protocol"]: {k: res[k] for k in keys if k in res} for res in report["results"]}
