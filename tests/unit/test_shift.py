"""Embedding shift metrics and average pooling (paper §5.2, Table 3)."""

from __future__ import annotations

import numpy as np
import pytest

from sum_models.shift import average_pool, shift_metrics


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
