"""Verdict rules of the snapshot gate (validation.gate.judge)."""

import numpy as np
import pytest

from sum_platform.config import GateConfig
from validation.gate import judge

CFG = GateConfig(probe_users=64, warmup_promotions=1, min_mean_cosine=0.8, max_relative_l2_change=0.35, max_ne=1.0, min_embedding_std=1e-4,
                 min_mean_cosine_pooled=0.9, max_relative_l2_change_pooled=0.2, max_ne_regression=0.01)
NE_OK = {"click": 0.8, "conversion": 0.9}


@pytest.fixture()
def production():
    return np.random.default_rng(0).normal(size=(64, 2, 16)).astype(np.float16)


def test_first_snapshot_is_judged_on_absolute_checks_only(production):
    v = judge(production, None, NE_OK, CFG)
    assert v.blessed and v.baseline_snapshot_id is None and v.shift == []
    assert any("first snapshot" in r for r in v.reasons)
    assert not any("cosine" in c.name for c in v.checks)


def test_small_change_is_blessed(production):
    cand = production + np.random.default_rng(1).normal(scale=0.05, size=production.shape).astype(np.float16)
    v = judge(cand, production, NE_OK, CFG, "sum-prev")
    assert v.blessed, v.reasons
    assert v.baseline_snapshot_id == "sum-prev"
    assert all(m["mean_cosine"] > 0.99 for m in v.shift)


def test_reinitialised_candidate_is_held_with_the_failed_check_named(production):
    cand = np.random.default_rng(2).normal(size=production.shape).astype(np.float16)
    v = judge(cand, production, NE_OK, CFG, "sum-prev")
    assert not v.blessed
    assert any(r.startswith("embedding_0.mean_cosine") for r in v.reasons)


def test_norm_blow_up_is_held(production):
    v = judge(production * 2, production, NE_OK, CFG, "sum-prev")
    assert not v.blessed
    assert any("relative_l2_change" in r for r in v.reasons)


def test_non_finite_embeddings_are_held(production):
    cand = production.copy()
    cand[0, 0, 0] = np.nan
    v = judge(cand, None, NE_OK, CFG)
    assert not v.blessed and "embeddings_finite" in v.reasons[-1]


def test_collapsed_embedding_is_held(production):
    cand = np.ones_like(production)
    v = judge(cand, None, NE_OK, CFG)
    assert not v.blessed and any("std_across_users" in r for r in v.reasons)


def test_ne_above_threshold_is_held(production):
    v = judge(production, None, {"click": 1.02, "conversion": 0.9}, CFG)
    assert not v.blessed and any(r.startswith("ne.click") for r in v.reasons)


def test_no_thresholds_configured_refuses_to_bless(production):
    v = judge(production, None, NE_OK, GateConfig(probe_users=64, warmup_promotions=1, min_embedding_std=1e-4))  # no thresholds
    assert not v.blessed and "not configured" in v.reasons[0]


def test_nan_candidate_is_held_without_crashing(production):
    cand = production.copy()
    cand[:, 0, :] = np.nan
    v = judge(cand, production, {"click": None, "conversion": None}, CFG, "sum-prev",
              production_ne=NE_OK, weights_finite=False)
    assert not v.blessed
    names = {c.name for c in v.checks if not c.passed}
    assert {"weights_finite", "embeddings_finite", "ne.click", "ne_regression.click"} <= names
    assert all(c.value is None for c in v.checks if c.name.startswith("ne"))


def test_ne_regression_against_production_is_held(production):
    v = judge(production, production, {"click": 0.85, "conversion": 0.9}, CFG, "sum-prev",
              production_ne={"click": 0.80, "conversion": 0.9})
    assert not v.blessed
    assert [r for r in v.reasons if r.startswith("ne_regression.click")]
    assert not [r for r in v.reasons if r.startswith("ne_regression.conversion")]


def test_pooled_shift_is_measured_against_the_pooled_production(production):
    rng = np.random.default_rng(3)
    older = [production + rng.normal(scale=0.1, size=production.shape) for _ in range(2)]
    cand = production + rng.normal(scale=0.3, size=production.shape)
    v = judge(cand, production, NE_OK, CFG, "sum-prev", history=older)
    for m in v.shift:
        # Pooling over three versions damps the change (paper Table 3).
        assert m["pooled_mean_cosine"] > m["mean_cosine"]
        assert m["pooled_relative_l2_change"] < m["relative_l2_change"] + 1e-9
    assert any(c.name == "embedding_1.pooled_mean_cosine" for c in v.checks)


def _history_slots(versions, ids):
    from sum_platform.embedding_row import Slots

    n, k, d = versions[0].shape
    out = Slots.empty(n, k, d)
    for s, (v, i) in enumerate(zip(versions, ids)):
        out.values[:, s], out.ids[:, s] = v.astype(np.float16), i
    return out


def test_the_pooled_shift_is_between_what_serving_hands_downstream_after_and_before_the_promotion(production):
    """The gate's "served after promotion" is the row owner's rule over the probe users' history (snapshot ids
    included), and "served now" is the pool of that history: under snapshot pooling the candidate joins production
    and the newest older version."""
    from sum_models.shift import average_pool, shift_metrics
    from sum_platform.embedding_row import pool, served_after_promotion

    rng = np.random.default_rng(4)
    older = [(production + rng.normal(scale=0.1, size=production.shape)).astype(np.float16) for _ in range(2)]
    cand = (production + rng.normal(scale=0.3, size=production.shape)).astype(np.float16)
    ids = ["sum-2026-01-03", "sum-2026-01-02", "sum-2026-01-01"]
    v = judge(cand, production, NE_OK, CFG, ids[0], history=older, candidate_id="sum-2026-01-04",
              history_ids=ids[1:], pool_unit="snapshot")
    history = _history_slots([production, *older], ids)
    after = served_after_promotion(history, cand, "sum-2026-01-04", "snapshot")
    now = pool(history.values)[0]
    np.testing.assert_array_equal(after, average_pool([cand, production, older[0]]))  # golden: the paper's 3 versions
    np.testing.assert_array_equal(now, average_pool([production, *older]))
    expected = shift_metrics(after, now)
    assert [m["pooled_mean_cosine"] for m in v.shift] == [e["mean_cosine"] for e in expected]
    assert [m["pooled_relative_l2_change"] for m in v.shift] == [e["relative_l2_change"] for e in expected]


def test_under_write_pooling_the_gate_checks_the_raw_candidate_against_raw_production(production):
    """``pool_unit: write``: after a few requests serving hands downstream the raw latest version, so the pooled
    checks see the unpooled shift (in fp16, as stored)."""
    from sum_models.shift import shift_metrics

    rng = np.random.default_rng(5)
    older = [(production + rng.normal(scale=0.1, size=production.shape)).astype(np.float16) for _ in range(2)]
    cand = (production + rng.normal(scale=0.3, size=production.shape)).astype(np.float16)
    by_write = judge(cand, production, NE_OK, CFG, "sum-prev", history=older, pool_unit="write")
    by_snapshot = judge(cand, production, NE_OK, CFG, "sum-prev", history=older, pool_unit="snapshot")
    raw = shift_metrics(cand, production)
    assert [m["pooled_mean_cosine"] for m in by_write.shift] == [r["mean_cosine"] for r in raw]
    assert all(s["pooled_mean_cosine"] > w["pooled_mean_cosine"] for s, w in zip(by_snapshot.shift, by_write.shift))


def test_a_missing_threshold_is_named_in_the_refusal(production):
    cfg = CFG.model_copy(update={"max_ne_regression": None})
    v = judge(production, None, NE_OK, cfg)
    assert not v.blessed and "gate.max_ne_regression" in v.reasons[0]


def test_verdict_summary_carries_the_headline_numbers_as_strict_json(production):
    import json

    from validation.gate import verdict_summary

    cand = np.random.default_rng(2).normal(size=production.shape).astype(np.float16)
    v = judge(cand, production, NE_OK, CFG, "sum-prev")
    summary = verdict_summary(v.to_dict() | {"snapshot_id": "sum-2026-01-04", "ds": "2026-01-04"},
                              {"click": 0.8, "conversion": float("nan")})
    assert summary["snapshot_id"] == "sum-2026-01-04" and summary["verdict"] == "held" and not summary["blessed"]
    assert summary["baseline_snapshot_id"] == "sum-prev"
    assert summary["ne"] == {"click": 0.8, "conversion": None}
    assert summary["min_mean_cosine"] == min(m["mean_cosine"] for m in v.shift) < CFG.min_mean_cosine
    assert summary["max_relative_l2_change"] == max(m["relative_l2_change"] for m in v.shift)
    assert [m["embedding"] for m in summary["shift"]] == [0, 1]
    assert summary["reasons"] == v.reasons
    json.dumps(summary, allow_nan=False)  # an asset event's extra is JSON


def test_verdict_summary_of_a_first_snapshot_has_no_shift(production):
    from validation.gate import verdict_summary

    v = judge(production, None, NE_OK, CFG)
    summary = verdict_summary(v.to_dict() | {"snapshot_id": "sum-2026-01-01"}, NE_OK)
    assert summary["blessed"] and summary["baseline_snapshot_id"] is None
    assert summary["min_mean_cosine"] is None and summary["max_relative_l2_change"] is None and summary["shift"] == []


def test_a_task_not_measurable_on_the_holdout_is_reported_not_failed(production):
    # A small day's holdout without a conversion: NE of that task is undefined, the rest is judged as usual.
    why = "all 8 labels are negative (background entropy is 0)"
    v = judge(production, None, {"click": 0.8, "conversion": None}, CFG, unmeasured={"conversion": why})
    assert v.blessed, v.reasons
    assert f"ne.conversion not measured: {why} on today's holdout" in v.reasons
    assert [c.name for c in v.checks if c.name.startswith("ne")] == ["ne.click"]
    held = judge(production, production, {"click": 1.5, "conversion": None}, CFG, "sum-prev",
                 production_ne={"click": 0.8}, unmeasured={"conversion": why})
    assert not held.blessed and any(r.startswith("ne.click") for r in held.reasons)
    # Without the reason, an undefined NE still fails: a None is never silently passed.
    assert not judge(production, None, {"click": 0.8, "conversion": None}, CFG).blessed


def test_during_the_warm_up_shift_is_reported_but_does_not_hold(production):
    cand = np.random.default_rng(2).normal(size=production.shape).astype(np.float16)  # a very different tower
    young = judge(cand, production, NE_OK, CFG, "sum-prev", enforce_shift=False)
    assert young.blessed, young.reasons
    assert young.shift and young.shift[0]["mean_cosine"] < CFG.min_mean_cosine  # measured all the same
    assert any(r.startswith("warm-up") and "embedding_0.mean_cosine" in r for r in young.reasons)
    assert not judge(cand, production, {"click": 1.5, "conversion": 0.9}, CFG, "sum-prev", enforce_shift=False).blessed


def test_candidate_only_non_finite_predictions_are_held_naming_them(production):
    """Holdout rows the candidate alone scores NaN/inf (inputs and production finite): its own defect, held with
    the count and the users; none of them: the check passes."""
    cand = production + 0.01 * np.random.default_rng(4).standard_normal(production.shape).astype(np.float32)
    v = judge(cand, production, NE_OK, CFG, "sum-prev", nonfinite_predictions={"count": 3, "users": [5, 9, 11]})
    assert not v.blessed
    assert any("3 holdout row(s) give the candidate NaN/inf predictions" in r and "[5, 9, 11]" in r for r in v.reasons)
    assert [c.passed for c in v.checks if c.name == "predictions_finite"] == [False]
    ok = judge(cand, production, NE_OK, CFG, "sum-prev", nonfinite_predictions=None)
    assert ok.blessed and [c.passed for c in ok.checks if c.name == "predictions_finite"] == [True]


def test_the_shift_reports_the_candidate_s_mean_norm_without_checking_it(production):
    big = (production.astype(np.float64) * 4).astype(np.float16)
    v = judge(big, big, NE_OK, CFG, "sum-prev")
    want = np.linalg.norm(big.astype(np.float64), axis=2).mean(axis=0)
    np.testing.assert_allclose([m["mean_norm"] for m in v.shift], want, rtol=1e-9)
    assert v.blessed and not any("norm" in c.name and "l2" not in c.name for c in v.checks)
