"""The match probability: Platt scaling at even prior odds, its reliability, its format."""

import numpy as np
import pytest

from model.calibration import Calibration, CalibrationError
from training.calibration import cross_camera_pairs, fit_platt, pair_weights, reliability


def synthetic_pairs(a=6.0, b=-3.0, n=60_000, keep_positives=0.05, seed=0):
    """Scores with P(same | s) = sigmoid(a s + b), then most positives dropped -> (scores,
    same, the intercept at even prior odds: b + ln(n_neg / n_pos) of the first draw)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, n)
    y = rng.uniform(size=n) < 1 / (1 + np.exp(-(a * s + b)))
    balanced_b = b + np.log((~y).sum() / y.sum())
    keep = ~y | (rng.uniform(size=n) < keep_positives)
    return s[keep], y[keep], balanced_b


def test_fit_recovers_the_balanced_odds_curve_whatever_the_base_rate():
    s, y, balanced_b = synthetic_pairs()
    assert y.mean() < 0.05  # rare positives, as in a gallery search
    cal = fit_platt(s, y)  # the 1/n1, 1/n2 weights undo the dropped positives
    assert cal.a == pytest.approx(6.0, rel=0.1)
    assert cal.b == pytest.approx(balanced_b, abs=0.3)
    assert cal.pairs == len(s) and cal.positives == int(y.sum())
    table = reliability(cal.probability(s), y)
    assert table["ece"] < 0.03
    assert sum(r["weight"] for r in table["bins"]) == pytest.approx(1.0)


def test_a_miscalibrated_curve_has_a_large_ece():
    s, y, _ = synthetic_pairs()
    wrong = Calibration(a=1.0, b=2.0)
    assert reliability(wrong.probability(s), y)["ece"] > 0.2


def test_probability_is_monotone_bounded_and_keeps_nan():
    cal = Calibration(a=50.0, b=-10.0)
    p = cal.probability(np.array([-1e6, 0.1, 0.2, 0.3, 1e6, np.nan]))
    assert p[0] == 0.0 and p[4] == 1.0 and np.all(np.diff(p[:5]) >= 0)
    assert np.isnan(p[5])


def test_calibration_format_is_checked():
    cal = Calibration(a=2.0, b=-1.0, pairs=10, positives=2, fitted_on="x")
    assert Calibration.from_dict(cal.to_dict()) == cal
    for bad in ({"a": 0.0, "b": 1.0}, {"a": float("nan"), "b": 0}, {"a": "2", "b": 0},
                {"a": 1.0}, {"a": 1.0, "b": 0.0, "extra": 1}, [1, 2],
                {"a": 1.0, "b": 0.0, "method": "isotonic"}):
        with pytest.raises(CalibrationError):
            Calibration.from_dict(bad)


def test_fit_refuses_scores_that_do_not_separate():
    with pytest.raises(ValueError, match="both"):
        pair_weights(np.zeros(5, bool))
    s = np.linspace(-1, 1, 200)
    with pytest.raises(ValueError, match="do not separate"):
        fit_platt(s, s < 0)


def test_cross_camera_pairs_leave_out_same_camera_pairs():
    dist = np.array([[0.1, 0.5, 0.9], [0.3, 0.2, 0.7]])
    scores, same = cross_camera_pairs(dist, [1, 2], [1, 2, 1], [1, 1], [2, 1, 2])
    np.testing.assert_allclose(scores, [0.9, 0.1, 0.7, 0.3])
    np.testing.assert_array_equal(same, [True, True, False, False])
