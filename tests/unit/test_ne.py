"""Normalized Entropy (paper eq. 9)."""

from __future__ import annotations

import numpy as np
import pytest

from sum_models.metrics import NormalizedEntropy, normalized_entropy


def _numpy_ne(p: np.ndarray, y: np.ndarray) -> float:
    """Independent eq. 9: mean log loss / entropy of the base rate."""
    p = p.astype(np.float64)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    rate = y.mean()
    return ll / -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))


def test_constant_predictor_at_base_rate_has_ne_one():
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=np.float64)
    p = np.full_like(y, y.mean())
    assert abs(normalized_entropy(p, y) - 1.0) < 1e-12


def test_matches_independent_numpy_computation_per_task():
    rng = np.random.default_rng(3)
    y = (rng.random((500, 2)) < [0.1, 0.03]).astype(np.float64)
    p = np.clip(rng.random((500, 2)) * 0.4, 0.001, 0.999)
    ne = NormalizedEntropy(("click", "conversion")).update(p, y).compute()
    assert ne["click"] == pytest.approx(_numpy_ne(p[:, 0], y[:, 0]), rel=1e-12)
    assert ne["conversion"] == pytest.approx(_numpy_ne(p[:, 1], y[:, 1]), rel=1e-12)
    # A better-than-constant predictor (informative) scores below 1, a worse one above.
    informative = np.where(y[:, 0] == 1, 0.6, 0.05)
    assert normalized_entropy(informative, y[:, 0]) < 1.0
    assert normalized_entropy(1 - informative, y[:, 0]) > 1.0


def test_merging_halves_equals_whole_and_is_associative():
    rng = np.random.default_rng(5)
    y = (rng.random((301, 2)) < 0.2).astype(np.float64)
    p = rng.random((301, 2)) * 0.5 + 0.01
    tasks = ("click", "conversion")
    whole = NormalizedEntropy(tasks).update(p, y).compute()
    a = NormalizedEntropy(tasks).update(p[:100], y[:100])
    b = NormalizedEntropy(tasks).update(p[100:200], y[100:200])
    c = NormalizedEntropy(tasks).update(p[200:], y[200:])
    left = a.merge(b).merge(c).compute()
    right = a.merge(b.merge(c)).compute()
    for task in tasks:
        assert left[task] == pytest.approx(whole[task], rel=1e-12)
        assert right[task] == pytest.approx(whole[task], rel=1e-12)
    # merge does not mutate its inputs
    assert a.count[0] == 100


def test_single_class_raises_naming_the_task():
    y = np.zeros((50, 2))
    y[:5, 0] = 1  # click has both classes, conversion has none positive
    p = np.full((50, 2), 0.1)
    with pytest.raises(ValueError, match="conversion"):
        NormalizedEntropy(("click", "conversion")).update(p, y).compute()
    with pytest.raises(ValueError, match="click"):
        normalized_entropy(np.full(10, 0.9), np.ones(10), task="click")


def test_clipping_keeps_confident_mistakes_finite():
    y = np.array([1.0, 0.0, 0.0, 0.0])
    ne = normalized_entropy(np.array([0.0, 0.0, 1.0, 0.0]), y)
    assert np.isfinite(ne) and ne > 1.0


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        normalized_entropy(np.array([0.5, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError):
        normalized_entropy(np.array([0.5, 0.5]), np.array([0, 2]))
    with pytest.raises(ValueError):
        NormalizedEntropy(("click", "conversion")).update(np.zeros((3, 1)), np.zeros((3, 1)))


def test_hand_computed_value_on_fixed_arrays():
    # Two impressions, one click: base rate 0.5, background entropy ln 2; log loss -(ln 0.8 + ln 0.8) / 2.
    ne = normalized_entropy(np.array([0.2, 0.8]), np.array([0.0, 1.0]))
    assert ne == pytest.approx(-np.log(0.8) / np.log(2.0), rel=1e-12)  # 0.3219...
    # Merging across "days" equals one pass over both days.
    day1 = NormalizedEntropy(("click",)).update(np.array([0.2, 0.8]), np.array([0.0, 1.0]))
    day2 = NormalizedEntropy(("click",)).update(np.array([0.1, 0.3, 0.6]), np.array([0.0, 0.0, 1.0]))
    both = NormalizedEntropy(("click",)).update(np.array([0.2, 0.8, 0.1, 0.3, 0.6]), np.array([0, 1, 0, 0, 1.0]))
    assert (day1 + day2).compute()["click"] == pytest.approx(both.compute()["click"], rel=1e-12)


def test_accepts_torch_tensors_and_accumulates_in_float64():
    import torch

    p = torch.tensor([0.2, 0.8], dtype=torch.float32)
    y = torch.tensor([0.0, 1.0])
    acc = NormalizedEntropy(("click",)).update(p, y)
    assert acc.log_loss_sum.dtype == np.float64
    assert acc.compute()["click"] == pytest.approx(-np.log(np.float32(0.8)) / np.log(2.0), rel=1e-7)


def test_compute_defined_scores_the_defined_tasks_and_says_why_not_the_others():
    acc = NormalizedEntropy(("click", "conversion")).update(
        np.full((4, 2), 0.3), np.array([[1, 0], [0, 0], [1, 0], [0, 0]]))
    ne, undefined = acc.compute_defined()
    assert list(ne) == ["click"] and ne["click"] == pytest.approx(normalized_entropy(np.full(4, 0.3), [1, 0, 1, 0]))
    assert undefined == {"conversion": "all 4 labels are negative (background entropy is 0)"}
    assert NormalizedEntropy(("click",)).compute_defined() == ({}, {"click": "no examples"})
