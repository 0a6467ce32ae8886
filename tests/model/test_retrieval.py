"""model/retrieval.py: the shortlist and the two-stage ordering (ties, NaN, k at the edges)."""

import numpy as np
import pytest

from model.retrieval import l2_normalise, shortlist, two_stage_order


def reference_order(scores) -> np.ndarray:
    """Every index, highest score first, equal scores in index order, NaN after -inf."""
    scores = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(scores)
    return np.lexsort((np.arange(len(scores)), -np.where(nan, -np.inf, scores), nan))


def test_l2_normalise_unit_rows_and_zero_row():
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0], [-2.0, 0.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]])


def test_shortlist_best_first():
    assert shortlist(np.array([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [1, 3]
    assert shortlist([0.1, 0.9, 0.5], 3).tolist() == [1, 2, 0]  # a list is fine


def test_shortlist_ties_keep_index_order_also_at_the_cut():
    scores = np.array([1.0, 2.0, 2.0, 0.0, 2.0, 2.0])
    assert shortlist(scores, 1).tolist() == [1]
    assert shortlist(scores, 3).tolist() == [1, 2, 4]
    assert shortlist(scores, 5).tolist() == [1, 2, 4, 5, 0]


def test_shortlist_nan_ranks_last_after_minus_inf():
    scores = np.array([np.nan, -np.inf, 1.0, np.nan, np.inf, -np.inf])
    assert shortlist(scores, 6).tolist() == [4, 2, 1, 5, 0, 3]
    assert shortlist(scores, 4).tolist() == [4, 2, 1, 5]
    assert shortlist(scores, 5).tolist() == [4, 2, 1, 5, 0]
    assert shortlist(np.array([np.nan, np.nan]), 1).tolist() == [0]


@pytest.mark.parametrize("k", [3, 4, 10])
def test_shortlist_k_at_least_n_sorts_everything(k):
    assert shortlist(np.array([0.2, 0.8, 0.5]), k).tolist() == [1, 2, 0]


@pytest.mark.parametrize("k", [0, -1])
def test_shortlist_k_zero_or_negative_is_empty(k):
    out = shortlist(np.array([0.2, 0.8]), k)
    assert out.dtype == np.int64 and out.size == 0


def test_shortlist_empty_scores():
    assert shortlist(np.zeros(0), 5).size == 0


def test_shortlist_rejects_a_matrix():
    with pytest.raises(ValueError, match="one-dimensional"):
        shortlist(np.zeros((2, 3)), 2)


def test_shortlist_matches_a_full_sort_for_every_k():
    # Few distinct values, NaN and infinities: ties at every cut.
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, 40).astype(np.float32)
        scores[rng.random(40) < 0.1] = np.nan
        scores[rng.random(40) < 0.05] = -np.inf
        ref = reference_order(scores)
        for k in range(0, 43):
            assert shortlist(scores, k).tolist() == ref[:k].tolist()


def test_two_stage_rerank_zero_is_stage_one_order():
    one = np.array([0.3, 0.9, 0.1, 0.5])
    two = np.array([9.0, -9.0, 5.0, 0.0])
    assert two_stage_order(one, two, 0).tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize("rerank", [4, 5, 100])
def test_two_stage_rerank_at_least_n_is_stage_two_order(rerank):
    one = np.array([0.3, 0.9, 0.1, 0.5])
    two = np.array([0.2, 0.1, 0.7, 0.4])
    assert two_stage_order(one, two, rerank).tolist() == [2, 3, 0, 1]


def test_two_stage_reorders_only_the_shortlist():
    one = np.array([0.3, 0.9, 0.1, 0.5, 0.8])     # stage-one order 1 4 3 0 2
    two = np.array([9.0, 0.1, 9.0, 0.4, 0.3])     # 0 and 2 are not shortlisted at rerank 3
    assert two_stage_order(one, two, 3).tolist() == [3, 4, 1, 0, 2]


def test_two_stage_reads_only_shortlisted_stage_two_entries():
    one = np.array([0.3, 0.9, 0.1, 0.5])
    two = np.array([np.nan, 0.1, np.nan, 0.4])  # not computed for 0 and 2
    assert two_stage_order(one, two, 2).tolist() == [3, 1, 0, 2]


def test_two_stage_ties_in_stage_two_follow_stage_one():
    one = np.array([0.1, 0.9, 0.5])
    two = np.array([0.7, 0.7, 0.7])
    assert two_stage_order(one, two, 3).tolist() == [1, 2, 0]


def test_two_stage_nan_ranks_last_in_both_stages():
    one = np.array([np.nan, 0.9, 0.5, 0.1])
    two = np.array([1.0, np.nan, 0.3, 0.2])
    # shortlist of 2 by stage one: 1, 2; the head's NaN for 1 puts it after 2.
    assert two_stage_order(one, two, 2).tolist() == [2, 1, 3, 0]


def test_two_stage_is_a_permutation():
    rng = np.random.default_rng(1)
    one, two = rng.random(50), rng.random(50)
    for rerank in (0, 1, 7, 49, 50, 60):
        assert sorted(two_stage_order(one, two, rerank).tolist()) == list(range(50))


def test_two_stage_empty_gallery():
    assert two_stage_order(np.zeros(0), np.zeros(0), 10).size == 0


def test_two_stage_rejects_negative_rerank():
    with pytest.raises(ValueError, match="rerank"):
        two_stage_order(np.array([0.1, 0.2]), np.array([0.1, 0.2]), -1)


@pytest.mark.parametrize("two", [np.zeros(2), np.zeros(4), np.zeros((3, 1))])
def test_two_stage_rejects_mismatched_shapes(two):
    with pytest.raises(ValueError, match="must both be"):
        two_stage_order(np.array([0.1, 0.2, 0.3]), two, 3)
