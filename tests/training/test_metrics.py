"""CMC / mAP rules (torchreid's eval_market1501) and the single-shot protocol."""

import numpy as np
import pytest

from training.metrics import (
    draw_single_shot_gallery,
    evaluate_ranking,
    rank_queries,
    single_shot,
)


def reference_market1501(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
    """A per-query loop written the way torchreid writes it, for comparison."""
    all_cmc, all_ap = [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q]))
        raw = (g_pids[order] == q_pids[q])[keep].astype(int)
        if not raw.any():
            continue
        cmc = np.minimum(raw.cumsum(), 1)
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), 1)])[:max_rank]
        all_cmc.append(cmc)
        precision = raw.cumsum() / np.arange(1, len(raw) + 1)
        all_ap.append((precision * raw).sum() / raw.sum())
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap))


def test_ap_is_half_when_the_match_is_second():
    dist = np.array([[0.1, 0.9]])  # ranked: gallery 0 (wrong), gallery 1 (right)
    cmc, mean_ap = evaluate_ranking(dist, [1], [2, 1], [1], [2, 2], max_rank=2)
    assert mean_ap == pytest.approx(0.5)
    np.testing.assert_allclose(cmc, [0.0, 1.0])


def test_average_precision_over_several_hits():
    # ranking: right, wrong, right, wrong -> AP = (1/1 + 2/3) / 2
    dist = np.array([[0.0, 1.0, 2.0, 3.0]])
    cmc, mean_ap = evaluate_ranking(dist, [5], [5, 6, 5, 7], [1], [2, 2, 2, 2], max_rank=4)
    assert mean_ap == pytest.approx((1 + 2 / 3) / 2)
    np.testing.assert_allclose(cmc, [1, 1, 1, 1])


def test_same_person_same_camera_is_removed_from_the_ranking():
    # Gallery 0 is the query's person in the query's camera: it would be rank 1 but is removed,
    # so the true match (gallery 2, another camera) comes after one wrong item: rank 2, AP 0.5.
    dist = np.array([[0.0, 0.5, 0.7]])
    cmc, mean_ap = evaluate_ranking(dist, [3], [3, 4, 3], [1], [1, 2, 2], max_rank=3)
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0])
    assert mean_ap == pytest.approx(0.5)
    # Same person in another camera at distance 0 is a hit at rank 1.
    cmc, mean_ap = evaluate_ranking(dist, [3], [3, 4, 3], [2], [1, 2, 2], max_rank=3)
    np.testing.assert_allclose(cmc, [1.0, 1.0, 1.0])


def test_query_without_a_valid_match_is_skipped():
    dist = np.array([[0.2, 0.1, 0.3],    # pid 1: match at rank 2 -> valid
                     [0.1, 0.2, 0.3],    # pid 9: nobody -> skipped
                     [0.3, 0.2, 0.1]])   # pid 2 cam 2: only match is same camera -> skipped
    res = rank_queries(dist, [1, 9, 2], [1, 3, 2], [1, 1, 2], [2, 2, 2], max_rank=3)
    assert res.num_valid_queries == 1
    assert res.valid.tolist() == [True, False, False]
    np.testing.assert_allclose(res.cmc, [0.0, 1.0, 1.0])
    assert res.mean_ap == pytest.approx(0.5)


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_ranking(np.zeros((2, 2)), [1, 2], [3, 4], [1, 1], [2, 2])


@pytest.mark.parametrize("args", [
    (np.zeros((2, 3)), [1], [1, 2, 3], [1, 1], [2, 2, 2]),      # query_pids too short
    (np.zeros((2, 3)), [1, 2], [1, 2], [1, 1], [2, 2, 2]),      # gallery_pids too short
    (np.zeros((2, 3)), [1, 2], [1, 2, 3], [1, 1], [2, 2]),      # gallery_cams too short
    (np.zeros(3), [1], [1, 2, 3], [1], [2, 2, 2]),              # not a matrix
    (np.zeros((0, 3)), [], [1, 2, 3], [], [2, 2, 2]),           # no queries
])
def test_shape_disagreements_raise(args):
    with pytest.raises(ValueError):
        evaluate_ranking(*args)


def test_rank_k_values():
    # Four queries whose first true match sits at rank 1, 2, 3 and 5.
    g_pids = np.array([10, 11, 12, 13, 14])
    g_cams = np.full(5, 2)
    def row(first_match_rank, pid):
        # put the match at the wanted position, the others before/after it in gallery order
        others = [j for j in range(5) if g_pids[j] != pid]
        ranking = others[:first_match_rank - 1] + [int(np.flatnonzero(g_pids == pid)[0])] \
            + others[first_match_rank - 1:]
        dist = np.empty(5)
        dist[ranking] = np.arange(5)
        return dist

    q_pids = [10, 11, 12, 14]
    dist = np.stack([row(1, 10), row(2, 11), row(3, 12), row(5, 14)])
    assert np.argsort(dist[3])[4] == 4  # pid 14's image is ranked last for the last query
    cmc, mean_ap = evaluate_ranking(dist, q_pids, g_pids, [1] * 4, g_cams, max_rank=5)
    np.testing.assert_allclose(cmc, [0.25, 0.5, 0.75, 0.75, 1.0])
    assert mean_ap == pytest.approx(np.mean([1, 1 / 2, 1 / 3, 1 / 5]))


def test_max_rank_longer_than_the_gallery_stays_at_the_last_value():
    dist = np.array([[0.1, 0.5], [0.1, 0.5]])  # query 1 matches at rank 1, query 2 at rank 2
    cmc, _ = evaluate_ranking(dist, [1, 2], [1, 2], [1, 1], [2, 2], max_rank=20)
    assert cmc.shape == (20,)
    np.testing.assert_allclose(cmc[:2], [0.5, 1.0])
    np.testing.assert_allclose(cmc[2:], 1.0)


def test_agrees_with_a_reference_loop_on_random_data():
    rng = np.random.default_rng(3)
    q, g = 40, 120
    q_pids, g_pids = rng.integers(0, 30, q), rng.integers(0, 30, g)
    q_cams, g_cams = rng.integers(1, 4, q), rng.integers(1, 4, g)
    dist = rng.random((q, g)).round(2)  # rounding makes ties: order must stay stable
    cmc, mean_ap = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, max_rank=25)
    ref_cmc, ref_ap = reference_market1501(dist, q_pids, g_pids, q_cams, g_cams, 25)
    np.testing.assert_allclose(cmc, ref_cmc)
    assert mean_ap == pytest.approx(ref_ap)


def _two_camera_problem(seed=0, ids=12, per_id=3):
    rng = np.random.default_rng(seed)
    q_pids = np.arange(ids)
    g_pids = np.repeat(np.arange(ids), per_id)
    dist = rng.random((ids, ids * per_id))
    return dist, q_pids, g_pids, np.ones(ids, int), np.full(ids * per_id, 2)


def test_single_shot_is_reproducible_with_a_seed():
    problem = _two_camera_problem()
    a = single_shot(*problem, trials=5, seed=7, max_rank=10)
    b = single_shot(*problem, trials=5, seed=7, max_rank=10)
    c = single_shot(*problem, trials=5, seed=8, max_rank=10)
    np.testing.assert_array_equal(a.trial_cmc, b.trial_cmc)
    np.testing.assert_array_equal(a.trial_map, b.trial_map)
    assert not np.array_equal(a.trial_map, c.trial_map)
    assert a.trials == 5 and a.trial_cmc.shape == (5, 10) and a.trial_map.shape == (5,)
    np.testing.assert_allclose(a.cmc, a.trial_cmc.mean(axis=0))
    assert a.mean_ap == pytest.approx(a.trial_map.mean())


def test_single_shot_trial_is_evaluate_ranking_on_one_image_per_identity():
    dist, q_pids, g_pids, q_cams, g_cams = _two_camera_problem(seed=1)
    result = single_shot(dist, q_pids, g_pids, q_cams, g_cams, trials=4, seed=3, max_rank=12)
    rng = np.random.default_rng(3)
    for t in range(4):
        cols = draw_single_shot_gallery(g_pids, rng)
        assert sorted(g_pids[cols].tolist()) == list(range(12))  # exactly one per identity
        cmc, mean_ap = evaluate_ranking(dist[:, cols], q_pids, g_pids[cols], q_cams,
                                        g_cams[cols], max_rank=12)
        np.testing.assert_allclose(result.trial_cmc[t], cmc)
        assert result.trial_map[t] == pytest.approx(mean_ap)
    # With one image per identity, every query ranks 12 items: CMC reaches 1 at rank 12.
    assert result.cmc[-1] == pytest.approx(1.0)


def test_single_shot_draws_cover_every_image_of_an_identity():
    g_pids = np.array([0, 0, 0, 1, 1, 2])
    rng = np.random.default_rng(0)
    seen = {tuple(draw_single_shot_gallery(g_pids, rng)) for _ in range(200)}
    assert {cols[0] for cols in seen} == {0, 1, 2}
    assert {cols[1] for cols in seen} == {3, 4}
    assert all(cols[2] == 5 for cols in seen)


def test_single_shot_keeps_every_distractor():
    g_pids = np.array([0, 0, 0, 1, 1, 2, 2])
    cols = draw_single_shot_gallery(g_pids, np.random.default_rng(0), keep_pids=[0])
    assert cols[:3].tolist() == [0, 1, 2]
    assert sorted(g_pids[cols[3:]].tolist()) == [1, 2]
