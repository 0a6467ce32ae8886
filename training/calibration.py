"""Fitting and checking the match probability (:class:`model.calibration.Calibration`)."""

from __future__ import annotations

import numpy as np

from model.calibration import Calibration

__all__ = ["fit_platt", "pair_weights", "reliability", "cross_camera_pairs", "CALIBRATION_FILE",
           "calibrate_checkpoint", "read_calibration"]


def pair_weights(same: np.ndarray) -> np.ndarray:
    """1/n1 for each positive pair and 1/n2 for each negative, scaled to sum to 2: even prior
    odds, as the binomial deviance weighs pairs."""
    same = np.asarray(same, dtype=bool)
    n1, n2 = same.sum(), (~same).sum()
    if n1 == 0 or n2 == 0:
        raise ValueError("calibration needs both same-person and different-person pairs")
    return np.where(same, 1.0 / n1, 1.0 / n2)


def fit_platt(scores: np.ndarray, same: np.ndarray, fitted_on: str = "",
              iterations: int = 50) -> Calibration:
    """Weighted logistic regression of ``same`` on ``scores`` (Newton's method, a tiny L2 term
    so that perfectly separated pairs still give finite a, b)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(same, dtype=bool).ravel().astype(np.float64)
    w = pair_weights(y.astype(bool))
    x = np.stack([s, np.ones_like(s)], 1)
    theta = np.array([1.0, 0.0])
    ridge = 1e-6 * np.eye(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (w * (p - y)) + ridge @ theta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    a, b = float(theta[0]), float(theta[1])
    if a <= 0:
        raise ValueError(f"scores do not separate same from different people (slope {a:.3g})")
    return Calibration(a=a, b=b, pairs=int(len(y)), positives=int(y.sum()), fitted_on=fitted_on)


def reliability(probabilities: np.ndarray, same: np.ndarray, bins: int = 10) -> dict:
    """Reliability table and expected calibration error (ECE) at even prior odds (pairs
    weighted by :func:`pair_weights`): per probability bin, the weighted mean predicted
    probability, the weighted share of same-person pairs, and the bin's weight."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(same, dtype=bool).ravel()
    w = pair_weights(y)
    w = w / w.sum()
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for k in range(bins):
        m = index == k
        weight = float(w[m].sum())
        if weight == 0:
            rows.append({"low": edges[k], "high": edges[k + 1], "weight": 0.0,
                         "predicted": None, "observed": None})
            continue
        predicted = float((w[m] * p[m]).sum() / weight)
        observed = float((w[m] * y[m]).sum() / weight)
        ece += weight * abs(predicted - observed)
        rows.append({"low": float(edges[k]), "high": float(edges[k + 1]), "weight": weight,
                     "predicted": predicted, "observed": observed})
    return {"ece": float(ece), "bins": rows}


def cross_camera_pairs(dist: np.ndarray, q_pids, g_pids, q_cams, g_cams
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Scores (1 - distance) and same-person flags of every query x gallery pair from
    different cameras: the pairs a cross-camera search ranks."""
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    keep = q_cams[:, None] != g_cams[None, :]
    same = q_pids[:, None] == g_pids[None, :]
    return (1.0 - np.asarray(dist, dtype=np.float64))[keep], same[keep]


CALIBRATION_FILE = "calibration.json"  # beside a run's checkpoints; the export copies it


def calibrate_checkpoint(checkpoint, queries, gallery, device: str = "cpu",
                         progress: bool = False, mirror_average: bool = False) -> Calibration:
    """Fit the match probability of ``checkpoint`` on the cross-camera pairs of ``queries`` x
    ``gallery`` (identities held out of training) and write it beside the checkpoint.
    ``mirror_average``: the scores of the model as exported with test-time flip."""
    import json
    from pathlib import Path

    from .evaluate import checkpoint_distances

    dist, _ = checkpoint_distances(checkpoint, queries, gallery, device=device,
                                   progress=progress, mirror_average=mirror_average)
    scores, same = cross_camera_pairs(dist, [r.pid for r in queries], [r.pid for r in gallery],
                                      [r.camid for r in queries], [r.camid for r in gallery])
    ids = len({r.pid for r in queries})
    calibration = fit_platt(scores, same, fitted_on=f"{ids} identities held out of training, "
                                                     f"{len(scores)} cross-camera pairs")
    path = Path(checkpoint).with_name(CALIBRATION_FILE)
    path.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
    return calibration


def read_calibration(path) -> Calibration | None:
    """The calibration stored at ``path`` (a file, or a run folder / checkpoint beside which
    it lies), or ``None`` when there is none."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.suffix != ".json":
        path = (path if path.is_dir() else path.parent) / CALIBRATION_FILE
    if not path.is_file():
        return None
    return Calibration.from_dict(json.loads(path.read_text()))
