"""bench/rerank_bench.py's ranking and accuracy logic on small synthetic data (no model, no
shared data): the edge reranks, the per-trial single-shot handling, the timed fast path."""

from pathlib import Path

import numpy as np
import pytest

from bench.common import tile_gallery
from bench.rerank_bench import (
    add_deltas,
    check_fast_path,
    cosine_matrix,
    evaluate_two_stage,
    parse_rerank,
    recommend,
    sort_reranks,
    timed_query,
    two_stage_distances,
)
from model.retrieval import two_stage_order
from training.data import ImageRecord
from training.metrics import draw_single_shot_gallery
from training.report import evaluate_distances

NUM_IDS, PER_ID = 20, 4  # gallery: 80 camera-2 images; queries: one camera-1 image per id


def records():
    queries = [ImageRecord(Path(f"q{p}.png"), p, 1, "val") for p in range(NUM_IDS)]
    gallery = [ImageRecord(Path(f"g{p}_{k}.png"), p, 2, "val")
               for p in range(NUM_IDS) for k in range(PER_ID)]
    return queries, gallery


def scores(informative_one: float, informative_two: float, seed: int = 0):
    """(Q, G) stage-one and stage-two similarities: noise plus ``informative_*`` for the
    query's own identity (distinct values: no ties)."""
    queries, gallery = records()
    rng = np.random.default_rng(seed)
    same = (np.array([q.pid for q in queries])[:, None]
            == np.array([g.pid for g in gallery])[None, :])
    one = rng.random(same.shape) + informative_one * same
    two = rng.random(same.shape) + informative_two * same
    return one, two, queries, gallery


def figures(report_result):
    return [report_result["rank1"], report_result["rank5"], report_result["mAP"],
            *report_result["cmc"]]


def test_parse_and_sort_reranks():
    assert [parse_rerank(v) for v in ("0", "10", "all", "ALL")] == [0, 10, None, None]
    with pytest.raises(ValueError):
        parse_rerank("-1")
    assert sort_reranks([None, 50, 0, 10, 50]) == [0, 10, 50, None]


def test_cosine_matrix():
    out = cosine_matrix(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[3.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(out, [[1.0, 2 ** -0.5], [0.0, 2 ** -0.5]], rtol=1e-6)


def test_distances_are_rank_positions_of_two_stage_order():
    one, two, _, _ = scores(0.3, 0.6)
    for rerank in (0, 3, 17, 80, 500):
        dist = two_stage_distances(one, two, rerank)
        for q in range(len(one)):
            assert np.argsort(dist[q], kind="stable").tolist() == \
                two_stage_order(one[q], two[q], rerank).tolist()


def test_rerank_zero_is_the_embedding_ranking_and_all_is_the_head_ranking():
    one, two, _, _ = scores(0.3, 0.6)
    np.testing.assert_array_equal(np.argsort(two_stage_distances(one, two, 0), axis=1),
                                  np.argsort(-one, axis=1, kind="stable"))
    exhaustive = np.argsort(-two, axis=1, kind="stable")
    np.testing.assert_array_equal(np.argsort(two_stage_distances(one, two, None), axis=1),
                                  exhaustive)
    # Any rerank reaching the gallery's size is exhaustive (scores without ties).
    for rerank in (NUM_IDS * PER_ID, 1000):
        np.testing.assert_array_equal(
            np.argsort(two_stage_distances(one, two, rerank), axis=1), exhaustive)


def test_exhaustive_ties_keep_gallery_order_like_evaluate():
    one = np.array([[0.9, 0.1, 0.5]])
    two = np.array([[0.4, 0.4, 0.4]])
    assert np.argsort(two_stage_distances(one, two, None)[0]).tolist() == [0, 1, 2]
    # (two_stage_order itself, at rerank >= N, settles them by stage one.)
    assert np.argsort(two_stage_distances(one, two, 3)[0]).tolist() == [0, 2, 1]


@pytest.mark.parametrize("rerank", [0, None])
def test_gallery_independent_reranks_match_evaluate_distances(rerank):
    """Rerank 0 and exhaustive rank every drawn gallery as the full ranking restricted to it,
    so the per-trial figures must be evaluate_distances' own: same draws, same averaging."""
    one, two, queries, gallery = scores(0.3, 0.6)
    ours = evaluate_two_stage(one, two, rerank, queries, gallery, trials=7, seed=3)
    theirs = evaluate_distances(-(two if rerank is None else one), queries, gallery,
                                trials=7, seed=3)
    by_protocol = {r["protocol"]: r for r in theirs["results"]}
    for protocol in ("single-shot", "all-gallery"):
        np.testing.assert_allclose(figures(ours[protocol]), figures(by_protocol[protocol]),
                                   rtol=0, atol=1e-12)
    assert ours["single-shot"]["per_trial"]["rank1"] == \
        pytest.approx(by_protocol["single-shot"]["per_trial"]["rank1"])
    assert ours["single-shot"]["gallery_size"] == NUM_IDS


def test_single_shot_two_stage_is_computed_within_each_drawn_gallery():
    """Stage one is noise, the head knows the answer. Re-scoring as many items as a drawn
    gallery holds (20) must give exhaustive's single-shot figures; the 20 best of the whole
    80-image gallery, restricted to the drawn columns afterwards, would not."""
    one, two, queries, gallery = scores(0.0, 2.0)
    exhaustive = evaluate_two_stage(one, two, None, queries, gallery, trials=5)
    within = evaluate_two_stage(one, two, NUM_IDS, queries, gallery, trials=5)
    assert figures(within["single-shot"]) == figures(exhaustive["single-shot"])
    assert exhaustive["single-shot"]["rank1"] == 1.0
    column_subset = evaluate_distances(two_stage_distances(one, two, NUM_IDS), queries,
                                       gallery, trials=5)["results"][0]
    assert column_subset["protocol"] == "single-shot"
    assert column_subset["rank1"] < 0.9
    # All-gallery is the whole gallery: there the 20 are too few.
    assert within["all-gallery"]["rank1"] < exhaustive["all-gallery"]["rank1"]


def test_single_shot_trials_by_hand_at_an_intermediate_rerank():
    """Rank-1 per trial counted directly: the same seeded draws as single_shot, the
    two-stage order of each drawn gallery."""
    one, two, queries, gallery = scores(0.4, 0.8, seed=5)
    rerank, trials, seed = 5, 4, 11
    ours = evaluate_two_stage(one, two, rerank, queries, gallery, trials=trials, seed=seed)
    g_pids = np.array([g.pid for g in gallery])
    rng = np.random.default_rng(seed)
    expected = []
    for _ in range(trials):
        cols = draw_single_shot_gallery(g_pids, rng)
        hits = [g_pids[cols][two_stage_order(one[q, cols], two[q, cols], rerank)[0]] == q
                for q in range(len(queries))]
        expected.append(np.mean(hits))
    assert ours["single-shot"]["per_trial"]["rank1"] == pytest.approx(expected)
    assert ours["single-shot"]["rank1"] == pytest.approx(np.mean(expected))


def rows_with(deltas):
    """Rows whose single-shot rank-1 / mAP sit ``deltas`` points from an exhaustive 50 / 60."""
    rows = [{"rerank": r, "single-shot": {"rank1": 0.5 + d1 / 100, "rank5": 0.7,
                                          "mAP": 0.6 + d2 / 100},
             "all-gallery": {"rank1": 0.5, "rank5": 0.7, "mAP": 0.4}}
            for r, (d1, d2) in deltas.items()]
    rows.append({"rerank": None, "single-shot": {"rank1": 0.5, "rank5": 0.7, "mAP": 0.6},
                 "all-gallery": {"rank1": 0.5, "rank5": 0.7, "mAP": 0.4}})
    add_deltas(rows)
    return rows


def test_recommend_smallest_within_tolerance():
    rows = rows_with({0: (-3.0, -1.0), 10: (-0.6, 0.0), 20: (-0.4, -0.5), 50: (0.0, 0.0)})
    assert rows[1]["delta_points"]["single-shot_rank1"] == pytest.approx(-0.6)
    assert recommend(rows, 0.5) == 20
    assert recommend(rows, 0.1) == 50
    assert recommend(rows_with({0: (-2.0, 0.0), 10: (-1.0, 0.0)}), 0.5) is None


def test_recommend_one_sided_accepts_a_gain():
    rows = rows_with({10: (1.0, 0.2), 20: (0.1, 0.1)})
    assert recommend(rows, 0.5) == 20
    assert recommend(rows, 0.5, one_sided=True) == 10


class FakeEngine:
    """score: the probe's embedding against a random projection of each gallery item's
    fields, so the head disagrees with the embedding cosine."""

    def __init__(self, dim=8):
        self.w = np.random.default_rng(7).standard_normal((dim, dim)).astype(np.float32)

    def score(self, probe, gallery):
        return (gallery["embedding"] @ self.w @ probe["embedding"][0]
                + gallery["joint"].sum(axis=1)).astype(np.float32)


def test_timed_fast_path_returns_two_stage_orders_top_k():
    rng = np.random.default_rng(2)
    base = {"embedding": rng.standard_normal((30, 8)).astype(np.float32),
            "joint": rng.standard_normal((30, 3)).astype(np.float32)}
    gallery = tile_gallery(base, 200, seed=1)
    assert gallery["embedding"].shape == (200, 8) and gallery["joint"].shape == (200, 3)
    assert len(np.unique(gallery["embedding"], axis=0)) == 200  # the copies differ
    engine = FakeEngine()
    unit = gallery["embedding"] / np.linalg.norm(gallery["embedding"], axis=1, keepdims=True)
    for _ in range(5):
        probe = {"embedding": rng.standard_normal((1, 8)).astype(np.float32)}
        for rerank in (0, 3, 10, 25, 200, None):
            check_fast_path(engine, probe, gallery, unit, rerank, top_k=10)  # raises if not
        s1, s2, top = timed_query(engine, probe, gallery, unit, 25, top_k=10)
        assert s1 >= 0 and s2 >= 0 and len(top) == 10
