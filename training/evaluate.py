"""``dsmi evaluate``'s library: a checkpoint's (or baseline's) query x gallery distances on a
test set, turned into a report with its figures.

- :func:`load_eval_data`: a test set by its dataset's protocol (:mod:`training.data.registry`);
- :func:`checkpoint_distances`: a checkpoint's distances through the
  :class:`~training.evaluator.Evaluator` that validation uses too;
- :func:`evaluate_and_write` / :func:`evaluate_run`: the report (:mod:`training.report`), its
  figures (:mod:`training.plots`) and, for a calibrated run, the match probability's
  reliability on the test pairs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.calibration import Calibration

from .calibration import cross_camera_pairs, read_calibration, reliability
from .data import registry
from .data.records import ImageRecord
from .data.registry import EvalData
from .plots import plot_cmc, plot_ranked, plot_reliability
from .report import evaluate_distances, record_ids, summarise, write_report

__all__ = ["DATASETS", "EvalData", "load_eval_data", "checkpoint_distances",
           "evaluate_and_write", "evaluate_run"]

DATASETS = tuple(registry.DATASETS)


# --- datasets and their protocols ----------------------------------------------------------

def load_eval_data(data: str | Path, dataset: str | None = None, split: str | None = None,
                   split_seed: int = 0, cuhk03_boxes: str = "labeled",
                   cuhk03_protocol: str = "random", cuhk03_testset: int = 1,
                   progress: bool = False) -> EvalData:
    """Read ``data`` (a manifest CSV or an official-layout root) and apply ``dataset``'s
    protocol (:mod:`training.data.registry`; a CSV without ``dataset`` is a manifest)."""
    data = Path(data)
    entry = registry.dataset(dataset or "manifest")
    if not data.exists():
        raise FileNotFoundError(f"--data not found: {data}")
    return entry.test_set(data, registry.EvalOptions(split, split_seed, cuhk03_boxes,
                                                     cuhk03_protocol, cuhk03_testset,
                                                     progress))


# --- the command ---------------------------------------------------------------------------


def checkpoint_distances(checkpoint: str | Path, queries: Sequence[ImageRecord],
                         gallery: Sequence[ImageRecord], device: str = "cpu",
                         batch_size: int = 64, pair_batch: int = 4096, num_workers: int = 0,
                         progress: bool = False, embedding_only: bool = False,
                         mirror_average: bool = False) -> tuple[np.ndarray, dict]:
    """Load a checkpoint and compute its ``(Q, G)`` distances -> ``(distances, model info)``.
    ``embedding_only``: see :class:`training.evaluator.Evaluator`; ``mirror_average``: each
    image's map averaged with its mirror image's (``MatchingNetwork.mirror_average``)."""
    import torch

    from model.checkpoint import load_checkpoint

    from .evaluator import distance_matrix

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device}: CUDA is not available here")
    net, payload = load_checkpoint(checkpoint, map_location="cpu")
    net.mirror_average = mirror_average
    net.to(device)
    dist = distance_matrix(net, queries, gallery, batch_size=batch_size, pair_batch=pair_batch,
                           device=device, num_workers=num_workers, progress=progress,
                           embedding_only=embedding_only)
    name = f"{net.variant} (embedding only)" if embedding_only else net.variant
    info = {"kind": "checkpoint", "name": name, "variant": net.variant,
            "embedding_only": embedding_only, "mirror_average": mirror_average,
            "checkpoint": str(Path(checkpoint).resolve()), "input_size": list(net.input_size),
            "epoch": payload.get("epoch")}
    return dist, info


def evaluate_and_write(distmat: np.ndarray, queries: Sequence[ImageRecord],
                       gallery: Sequence[ImageRecord], out: str | Path, *, meta: dict,
                       trials: int = 10, seed: int = 0, max_rank: int = 20,
                       keep_pids: Sequence[int] = (), ranked_queries: int = 6,
                       save_distances: bool = False,
                       calibration: Calibration | None = None) -> dict:
    """:func:`evaluate_distances`, then ``report.json``, ``cmc.png``, ``ranked.png`` (and
    ``distances.npz`` if asked) in ``out`` -> the report (with a ``summary``). With a
    ``calibration`` (a model's match probability), its reliability on these cross-camera
    pairs too: ``report["calibration"]`` (with the expected calibration error) and
    ``reliability.png``."""
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
        q_pids, q_cams = record_ids(queries)
        g_pids, g_cams = record_ids(gallery)
        np.savez_compressed(out / "distances.npz", distances=np.asarray(distmat),
                            query_pids=q_pids, query_camids=q_cams, gallery_pids=g_pids,
                            gallery_camids=g_cams,
                            query_paths=np.asarray([str(r.path) for r in queries]),
                            gallery_paths=np.asarray([str(r.path) for r in gallery]))
    if calibration is not None:
        # How well the held-out fit's probabilities hold on this test set.
        (q_pids, q_cams), (g_pids, g_cams) = record_ids(queries), record_ids(gallery)
        scores, same = cross_camera_pairs(distmat, q_pids, g_pids, q_cams, g_cams)
        table = reliability(calibration.probability(scores), same)
        report["calibration"] = {**calibration.to_dict(), **table}
        plot_reliability(table, out / "reliability.png")
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
    return evaluate_and_write(dist, queries, gallery, out, meta=meta, trials=trials,
                              seed=seed, max_rank=max_rank, keep_pids=keep,
                              ranked_queries=ranked_queries,
                              calibration=read_calibration(checkpoint))
