"""The consumer check's numbers (validation.consumers): the paired NE change over users, its interval, the share of
impressions made worse, and when a consumer is held, passed or not measurable."""

from __future__ import annotations

import numpy as np
import pytest

from validation.consumers import consumer_users, measure_consumer, paired_ne_ratio

RULES = dict(min_label_count=30, max_regression_pct=1.0, worse_tolerance=0.05, resamples=400, seed=0)


@pytest.fixture()
def holdout():
    """2,000 impressions of 200 users; a calibrated consumer (predictions near each row's true rate)."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 10)
    rate = 1 / (1 + np.exp(-(rng.normal(-1.0, 1.0, 200)[users] + rng.normal(0, 0.5, len(users)))))
    labels = (rng.random(len(users)) < rate).astype(np.int8)
    return users, labels, rate


def test_the_same_predictions_change_nothing(holdout):
    users, labels, rate = holdout
    effect = measure_consumer("click", users, labels, rate, rate.copy(), np.full_like(rate, labels.mean()), **RULES)
    assert effect.outcome == "pass" and effect.change_pct == pytest.approx(0.0, abs=1e-9)
    assert effect.change_ci == pytest.approx([0.0, 0.0], abs=1e-9) and effect.worse_share == 0.0
    # The consumer with SUM beats its twin without (a base-rate predictor): negative, the interval below 0.
    assert effect.vs_without_pct < 0 and effect.vs_without_ci[1] < 0
    assert effect.users == 200 and effect.rows == 2000 and effect.positives == int(labels.sum())


def test_predictions_pushed_away_from_their_labels_are_held_and_the_line_names_why(holdout):
    users, labels, rate = holdout
    worse = np.clip(rate + np.where(labels == 1, -0.15, 0.15), 0.01, 0.99)
    effect = measure_consumer("click", users, labels, rate, worse, None, **RULES)
    assert effect.outcome == "fail" and effect.change_pct > 1.0 and effect.change_ci[0] > 0
    assert effect.worse_share > 0.9 and effect.vs_without_pct is None
    assert "consumer_max_ne_regression_pct" in effect.why
    line = effect.line()
    assert "click" in line and "+1 %" in line and "2000 impressions of 200 users" in line


def test_a_small_real_regression_within_the_tolerance_passes(holdout):
    """Direction: predictions moved 0.002 away from their labels worsen NE for sure (interval above 0), by less than
    the 1 % tolerated; 0.005 away goes beyond it."""
    users, labels, rate = holdout
    slightly = np.clip(rate + np.where(labels == 1, -0.002, 0.002), 0.001, 0.999)
    effect = measure_consumer("click", users, labels, rate, slightly, None, **RULES)
    assert 0 < effect.change_ci[0] and effect.change_pct < 1.0 and effect.outcome == "pass"
    more = np.clip(rate + np.where(labels == 1, -0.005, 0.005), 0.001, 0.999)
    assert measure_consumer("click", users, labels, rate, more, None, **RULES).outcome == "fail"


def test_noise_alone_is_not_a_regression(holdout):
    """Invariance: predictions that differ from now's by zero-mean noise give an interval that covers 0."""
    users, labels, rate = holdout
    noisy = np.clip(rate + np.random.default_rng(1).normal(0, 0.01, len(rate)), 0.001, 0.999)
    effect = measure_consumer("click", users, labels, rate, noisy, None, **RULES)
    assert effect.change_ci[0] < 0 < effect.change_ci[1] or abs(effect.change_pct) < 0.2
    assert effect.outcome == "pass"


def test_too_few_labels_is_not_measurable(holdout):
    users, labels, rate = holdout
    keep = np.flatnonzero(labels == 0)[:300].tolist() + np.flatnonzero(labels == 1)[:12].tolist()
    effect = measure_consumer("conversion", users[keep], labels[keep], rate[keep], rate[keep] * 0.5, None, **RULES)
    assert effect.outcome == "not_measurable" and "12 rows of the scarcer label" in effect.why
    assert effect.change_pct is None and "not measurable" in effect.line()


def test_the_interval_resamples_users_not_impressions():
    """Users whose impressions move together: the user-level interval is wider than an impression-level one would
    be, and one user alone has no interval."""
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(40), 50)
    labels = (rng.random(len(users)) < 0.3).astype(float)
    shift = rng.normal(0, 0.3, 40)[users]  # a per-user effect: all of a user's rows get better or worse together
    a, b = rng.random(len(users)) * 0.2 + 0.5 + shift, np.full(len(users), 0.5)
    from validation.consumers import _log_loss

    la, lb = _log_loss(np.clip(a, 0.01, 0.99), labels), _log_loss(b, labels)
    _, by_user = paired_ne_ratio(users, labels, la, lb, 400, 0)
    _, by_row = paired_ne_ratio(np.arange(len(users)), labels, la, lb, 400, 0)
    assert by_user[1] - by_user[0] > 1.5 * (by_row[1] - by_row[0])
    assert paired_ne_ratio(np.zeros(10), np.array([0, 1] * 5, float), la[:10], lb[:10], 100, 0)[1] is None


def test_the_consumer_users_are_a_fixed_share_of_users():
    ids = np.arange(20_000)
    chosen = consumer_users(ids, 0.1)
    assert 0.09 < chosen.mean() < 0.11
    assert (consumer_users(ids[::-1], 0.1) == chosen[::-1]).all()  # per user, not per position
    assert not consumer_users(ids, 0.0).any()
