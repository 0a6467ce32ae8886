"""Ranking metrics for re-identification: CMC and mAP over a query x gallery distance matrix.

The rules are those of torchreid's ``eval_market1501`` (and of the Market-1501 evaluation code):

- the gallery is ranked by increasing distance (ties keep gallery order);
- a gallery image of the query's person taken by the query's camera is not a valid match, nor a
  valid mismatch: it is removed from that query's ranking;
- a query with no true match left in its ranking is skipped (it counts in neither CMC nor mAP);
- CMC at rank k is the fraction of the remaining queries whose first true match is within the
  first k of its ranking; AP is the mean, over the query's true matches, of the precision at the
  rank of each match (non-interpolated).

:func:`single_shot` adds the paper's protocol: one gallery image per identity, drawn at random,
evaluated ``trials`` times and averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["evaluate_ranking", "rank_queries", "RankingResult", "single_shot",
           "SingleShotResult", "draw_single_shot_gallery"]

# Rows of the distance matrix ranked at once: bounds memory to a few (rows x G) int64 arrays
# (Market-1501: 3368 x 19732 distances would otherwise need ~0.5 GB per array).
_ROW_CHUNK = 512


@dataclass(frozen=True)
class RankingResult:
    """CMC ``(max_rank,)``, mAP, and how many queries were valid (had a true match)."""

    cmc: np.ndarray
    mean_ap: float
    num_valid_queries: int
    average_precision: np.ndarray  # (num_valid_queries,) per valid query, in query order
    valid: np.ndarray              # (Q,) bool: which queries counted


def _as_1d(name: str, values, length: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} entries but the distance matrix needs "
                         f"{length}")
    return arr


def _check(distmat, query_pids, gallery_pids, query_cams, gallery_cams, max_rank):
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be (num_queries, num_gallery), got shape {distmat.shape}")
    num_q, num_g = distmat.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"empty distance matrix {distmat.shape}: need at least one query and "
                         "one gallery item")
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    if not np.issubdtype(distmat.dtype, np.number):
        raise ValueError(f"distmat must be numeric, got dtype {distmat.dtype}")
    if np.isnan(distmat).any():
        raise ValueError("distmat contains NaN distances")
    return (distmat, _as_1d("query_pids", query_pids, num_q),
            _as_1d("gallery_pids", gallery_pids, num_g),
            _as_1d("query_cams", query_cams, num_q),
            _as_1d("gallery_cams", gallery_cams, num_g))


def rank_queries(distmat, query_pids, gallery_pids, query_cams, gallery_cams,
                 max_rank: int = 20) -> RankingResult:
    """:func:`evaluate_ranking` with the per-query details (valid mask, AP per query).

    Raises ``ValueError`` when the shapes disagree or no query has a valid true match.
    """
    distmat, q_pids, g_pids, q_cams, g_cams = _check(
        distmat, query_pids, gallery_pids, query_cams, gallery_cams, max_rank)
    max_rank = int(max_rank)
    num_q, num_g = distmat.shape
    first_hit = np.empty(num_q, dtype=np.int64)  # 0-based rank of the first true match
    ap = np.zeros(num_q, dtype=np.float64)
    valid = np.zeros(num_q, dtype=bool)
    for start in range(0, num_q, _ROW_CHUNK):
        rows = slice(start, min(start + _ROW_CHUNK, num_q))
        order = np.argsort(distmat[rows], axis=1, kind="stable")
        ranked_pids, ranked_cams = g_pids[order], g_cams[order]
        same_pid = ranked_pids == q_pids[rows, None]
        keep = ~(same_pid & (ranked_cams == q_cams[rows, None]))
        hits = same_pid & keep
        # Position of each kept item in the query's ranking once the removed items are gone.
        position = np.cumsum(keep, axis=1) - 1
        num_hits = hits.sum(axis=1)
        has_hit = num_hits > 0
        valid[rows] = has_hit
        first_hit[rows] = np.where(has_hit, position[np.arange(order.shape[0]),
                                                     hits.argmax(axis=1)], -1)
        # Precision at each hit: (hits so far) / (rank of the hit, 1-based).
        # (Removed items before the first kept one sit at position -1; they are never hits.)
        precision = np.cumsum(hits, axis=1) / np.maximum(position + 1.0, 1.0)
        ap_sum = np.where(hits, precision, 0.0).sum(axis=1)
        ap[rows] = np.divide(ap_sum, num_hits, out=np.zeros_like(ap_sum), where=has_hit)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f"no valid query: none of the {num_q} queries has a true match in the "
                         f"gallery of {num_g} (a match must be the same person seen by another "
                         "camera)")
    ranks = np.arange(max_rank)
    cmc = (first_hit[valid, None] <= ranks[None, :]).mean(axis=0)
    return RankingResult(cmc.astype(np.float64), float(ap[valid].mean()), num_valid,
                         ap[valid], valid)


def evaluate_ranking(distmat, query_pids, gallery_pids, query_cams, gallery_cams,
                     max_rank: int = 20) -> tuple[np.ndarray, float]:
    """CMC and mAP of a ``(Q, G)`` distance matrix (lower distance = better match).

    Returns ``(cmc, mean_ap)``: ``cmc`` a float array of length ``max_rank`` whose entry k-1 is
    the fraction of valid queries whose first true match is within rank k; ``mean_ap`` the mean
    of the valid queries' average precisions. Gallery items of the query's person and camera are
    removed from that query's ranking; queries without a true match left are skipped. When
    ``max_rank`` is longer than a ranking, the curve stays at its last value (every valid query
    has found its match by then). Raises ``ValueError`` when shapes disagree or no query is valid.
    """
    result = rank_queries(distmat, query_pids, gallery_pids, query_cams, gallery_cams, max_rank)
    return result.cmc, result.mean_ap


@dataclass(frozen=True)
class SingleShotResult:
    """Single-shot CMC/mAP averaged over random one-image-per-identity galleries."""

    cmc: np.ndarray               # (max_rank,) mean over trials
    mean_ap: float                # mean over trials
    trial_cmc: np.ndarray         # (trials, max_rank)
    trial_map: np.ndarray         # (trials,)
    trial_valid_queries: np.ndarray = field(repr=False)  # (trials,) valid queries per trial
    trials: int = 0
    seed: int | None = None

    def as_dict(self) -> dict:
        return {"cmc": self.cmc.tolist(), "mAP": self.mean_ap, "trials": self.trials,
                "seed": self.seed, "trial_cmc": self.trial_cmc.tolist(),
                "trial_mAP": self.trial_map.tolist(),
                "trial_valid_queries": self.trial_valid_queries.tolist()}


def draw_single_shot_gallery(gallery_pids, rng: np.random.Generator,
                             keep_pids=()) -> np.ndarray:
    """Indices (sorted) of one gallery item per identity, drawn uniformly with ``rng``.

    Items whose pid is in ``keep_pids`` (e.g. Market-1501's distractors, pid 0: different people
    with no match, not one identity) are all kept.
    """
    g_pids = np.asarray(gallery_pids)
    keep_all = np.isin(g_pids, np.asarray(list(keep_pids), dtype=g_pids.dtype))
    pids, inverse = np.unique(g_pids[~keep_all], return_inverse=True)
    candidates = np.flatnonzero(~keep_all)
    # A random key per item; the smallest key of each identity wins (uniform per identity).
    keys = rng.random(candidates.shape[0])
    order = np.lexsort((keys, inverse))
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = inverse[order][1:] != inverse[order][:-1]
    chosen = candidates[order[first]]
    assert chosen.shape[0] == pids.shape[0]
    return np.sort(np.concatenate([chosen, np.flatnonzero(keep_all)]))


def single_shot(distmat, query_pids, gallery_pids, query_cams, gallery_cams, trials: int = 10,
                seed: int | None = 0, max_rank: int = 20, keep_pids=()) -> SingleShotResult:
    """The paper's single-shot protocol: each of ``trials`` draws one gallery image per
    identity (a seeded ``numpy.random.Generator``: the same seed gives the same figures) and
    runs :func:`evaluate_ranking` on that gallery; returns the means and per-trial values.

    ``keep_pids``: gallery pids whose images are all kept in every trial (distractors).
    A query whose drawn gallery holds no valid match (e.g. the drawn image shares its camera) is
    skipped in that trial, as in :func:`evaluate_ranking`.
    """
    if int(trials) < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    distmat, q_pids, g_pids, q_cams, g_cams = _check(
        distmat, query_pids, gallery_pids, query_cams, gallery_cams, max_rank)
    rng = np.random.default_rng(seed)
    cmcs, maps, valids = [], [], []
    for _ in range(int(trials)):
        cols = draw_single_shot_gallery(g_pids, rng, keep_pids)
        result = rank_queries(distmat[:, cols], q_pids, g_pids[cols], q_cams, g_cams[cols],
                              max_rank)
        cmcs.append(result.cmc)
        maps.append(result.mean_ap)
        valids.append(result.num_valid_queries)
    trial_cmc = np.stack(cmcs)
    trial_map = np.asarray(maps)
    return SingleShotResult(trial_cmc.mean(axis=0), float(trial_map.mean()), trial_cmc,
                            trial_map, np.asarray(valids), int(trials), seed)
