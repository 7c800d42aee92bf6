"""Embedding shift metrics and average pooling (paper §5.2, Table 3)."""

from __future__ import annotations

import numpy as np
import pytest

from sum_models.shift import average_pool, shift_by_pooling_depth, shift_metrics


@pytest.fixture
def emb() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(20, 2, 6)).astype(np.float32)


def test_identical_embeddings(emb):
    out = shift_metrics(emb, emb.copy())
    assert [m["embedding"] for m in out] == [0, 1]
    for m in out:
        assert m["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
        assert m["relative_l2_change"] == pytest.approx(0.0, abs=1e-12)


def test_scaled_embeddings(emb):
    for m in shift_metrics(emb.astype(np.float64) * 1.1, emb.astype(np.float64)):
        assert m["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
        assert m["relative_l2_change"] == pytest.approx(0.1, abs=1e-12)


def test_orthogonal_embeddings():
    prod = np.zeros((5, 2, 4))
    cand = np.zeros((5, 2, 4))
    prod[:, :, 0] = 1.0
    cand[:, :, 1] = 2.0
    out = shift_metrics(cand, prod)
    for m in out:
        assert m["mean_cosine"] == pytest.approx(0.0, abs=1e-12)
        assert m["relative_l2_change"] == pytest.approx(1.0, abs=1e-12)


def test_per_embedding_values_differ():
    prod = np.ones((4, 2, 3))
    cand = prod.copy()
    cand[:, 1] = -1.0  # only embedding 1 flips
    out = shift_metrics(cand, prod)
    assert out[0]["mean_cosine"] == pytest.approx(1.0)
    assert out[1]["mean_cosine"] == pytest.approx(-1.0)


def test_fp16_inputs_are_computed_in_float64(emb):
    out = shift_metrics(emb.astype(np.float16), emb.astype(np.float16))
    assert out[0]["mean_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_shape_mismatch_raises(emb):
    with pytest.raises(ValueError, match="shape"):
        shift_metrics(emb, emb[:10])
    with pytest.raises(ValueError):
        shift_metrics(emb[:, 0], emb[:, 0])


def test_average_pool_is_the_mean(emb):
    a, b, c = emb, emb * 2, emb * -0.5
    pooled = average_pool([a, b, c])
    np.testing.assert_allclose(pooled, (a + b + c) / 3, rtol=1e-6)
    assert pooled.dtype == np.float32
    half = average_pool([a.astype(np.float16), b.astype(np.float16)])
    assert half.dtype == np.float16
    np.testing.assert_allclose(average_pool([a]), a)


def test_average_pool_rejects_bad_input(emb):
    with pytest.raises(ValueError):
        average_pool([])
    with pytest.raises(ValueError):
        average_pool([emb, emb[:3]])


def test_pooling_damps_independent_daily_noise():
    """Table 3's direction on a constructed case: versions = a fixed signal plus fresh noise each day, so
    AP_k(t) and AP_k(t-1) share k-1 of their k days and their difference shrinks as k grows."""
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(200, 2, 8))
    versions = [signal + rng.normal(scale=0.5, size=signal.shape) for _ in range(12)]
    rows = shift_by_pooling_depth(versions)
    for e in (0, 1):
        by_k = {r["pooling"]: r for r in rows if r["embedding"] == e}
        assert sorted(by_k) == [1, 2, 3, 4, 5]
        cosines = [by_k[k]["cosine"] for k in range(1, 6)]
        l2 = [by_k[k]["l2_change"] for k in range(1, 6)]
        assert cosines == sorted(cosines) and l2 == sorted(l2, reverse=True)
        assert by_k[5]["days"] == 12 - 5 and by_k[1]["days"] == 11
    # For independent noise AP_3(t) - AP_3(t-1) = (v_t - v_{t-3}) / 3: a third of a raw day's difference (its
    # denominator, the pooled vector, is a little shorter: the noise in it is averaged down too).
    raw, ap3 = (next(r for r in rows if r["pooling"] == k and r["embedding"] == 0) for k in (1, 3))
    assert raw["l2_change"] / 4 < ap3["l2_change"] < raw["l2_change"] / 2


def test_pooling_depth_golden_and_limits():
    day = np.ones((4, 2, 3))
    rows = shift_by_pooling_depth([day, 2 * day, 3 * day], depths=(1, 2, 3))
    # k=1: |2-1|/1 and |3-2|/2 -> mean 0.75; k=2: |2.5-1.5|/1.5 -> 0.667; k=3 needs 4 versions: left out.
    assert [(r["pooling"], round(r["l2_change"], 3)) for r in rows] == [(1, 0.75), (1, 0.75), (2, 0.667), (2, 0.667)]
    assert all(r["cosine"] == pytest.approx(1.0) for r in rows)
    with pytest.raises(ValueError, match="depth"):
        shift_by_pooling_depth([day, day], depths=(0,))


def test_mean_norms_are_per_embedding_means_over_users():
    from sum_models.shift import mean_norms

    e = np.zeros((2, 2, 3), dtype=np.float16)
    e[0, 0], e[1, 0] = [3, 4, 0], [0, 0, 1]  # embedding 0: norms 5 and 1
    e[:, 1] = [0, 2, 0]                      # embedding 1: norm 2 for both users
    assert mean_norms(e) == [3.0, 2.0]
    e[1, 0, 0] = np.nan  # a non-finite row is left out, not propagated
    assert mean_norms(e) == [5.0, 2.0]
    with pytest.raises(ValueError):
        mean_norms(np.zeros((0, 2, 3)))
    with pytest.raises(ValueError):
        mean_norms(np.zeros((2, 3)))
