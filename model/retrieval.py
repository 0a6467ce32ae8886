"""Two-stage retrieval: shortlist by the per-image embeddings, re-score with the pair head.

Torch-free (NumPy only): the service ranks with it and the evaluation measures it, so both
order a gallery the same way.

Stage one scores every gallery item by the cosine of the per-image embeddings (``FC(g)``, what
``--embedding-only`` evaluates: one matrix-vector product). Stage two re-scores the best
``rerank`` of them with the DSMI pair head. The ranking is the re-scored shortlist, best first,
then the rest of the gallery in stage-one order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["shortlist", "l2_normalise", "two_stage_order"]


def l2_normalise(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``(N, D)`` scaled to unit length (float32); an all-zero row stays zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, eps)


def shortlist(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest ``scores`` ``(N,)``, best first; equal scores keep index
    order and NaN ranks last (after ``-inf``). ``k >= N`` sorts everything."""
    raw = np.asarray(scores, dtype=np.float64)
    if raw.ndim != 1:
        raise ValueError(f"scores must be one-dimensional (N,), not of shape {raw.shape}")
    nan = np.isnan(raw)
    scores = np.where(nan, -np.inf, raw)
    n = len(scores)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        # argpartition is O(N); only the k kept are sorted. Ties at the cut are settled by
        # the stable sort below, so the result does not depend on argpartition's choice.
        # (NaN counts as -inf here: when the cut falls at -inf, every -inf and NaN is a
        # candidate and the sort below puts the NaN after the -inf.)
        kth = np.partition(-scores, k - 1)[k - 1]
        candidates = np.flatnonzero(-scores <= kth)
    else:
        candidates = np.arange(n)
    order = candidates[np.lexsort((candidates, -scores[candidates], nan[candidates]))]
    return order[:k]


def two_stage_order(stage_one: np.ndarray, stage_two: np.ndarray, rerank: int) -> np.ndarray:
    """The full two-stage ranking of one query, as gallery indices best first.

    ``stage_one``: ``(N,)`` embedding similarities; ``stage_two``: ``(N,)`` pair-head
    similarities (only the shortlisted entries are read, so the others may be anything);
    ``rerank``: how many stage-one best are re-scored (``>= N``: the head alone decides;
    ``0``: the embeddings alone). Raises ``ValueError`` for a negative ``rerank`` or
    mismatched shapes.
    """
    stage_one, stage_two = np.asarray(stage_one), np.asarray(stage_two)
    if stage_one.ndim != 1 or stage_two.shape != stage_one.shape:
        # A shorter stage_two would fail only for some queries, a longer one silently
        # re-score with the wrong entries.
        raise ValueError(f"stage_one and stage_two must both be (N,), not {stage_one.shape} "
                         f"and {stage_two.shape}")
    if rerank < 0:
        # first[:-1] would quietly re-score all but the last item.
        raise ValueError(f"rerank must be at least 0, not {rerank}")
    first = shortlist(stage_one, len(stage_one))
    head = first[:rerank]
    rescored = head[shortlist(stage_two[head], len(head))]
    return np.concatenate([rescored, first[len(head):]])
