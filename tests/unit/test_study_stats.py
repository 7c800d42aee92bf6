"""The study's confidence intervals over seeds (Student-t), clipped to a quantity's possible range."""

from __future__ import annotations

import pytest

from sum_pipeline.study import t_interval


def test_t_interval_of_three_seeds():
    # mean 2, standard error 1/sqrt(3), t(0.975, 2 d.o.f.) = 4.303: half width 2.484
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert lo == pytest.approx(2 - 2.4841, abs=1e-3) and hi == pytest.approx(2 + 2.4841, abs=1e-3)


def test_a_rank_interval_stays_within_one_and_the_feature_count():
    assert t_interval([1.0, 2.0, 3.0], lower=1, upper=3) == [1, 3]
    assert t_interval([2.0, 2.0, 2.0], lower=1, upper=9) == [2.0, 2.0]


def test_no_interval_from_a_single_seed_or_missing_values():
    assert t_interval([0.5]) is None
    assert t_interval([0.5, None, float("nan")]) is None
