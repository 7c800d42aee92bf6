"""Verdict rules of the snapshot gate (validation.gate.judge)."""

import numpy as np
import pytest

from sum_platform.config import GateConfig
from validation.gate import judge

CFG = GateConfig(probe_users=64, warmup_promotions=1, min_mean_cosine=0.8, max_relative_l2_change=0.35, max_ne=1.0, min_embedding_std=1e-4,
                 min_mean_cosine_pooled=0.9, max_relative_l2_change_pooled=0.2, max_ne_regression=0.01,
                 max_cosine_across_users=0.9, min_label_count=30, not_measurable_without_production="hold", mode="both", consumer_holdout_users=0.1, consumer_max_ne_regression_pct=1.0,
                 consumer_worse_tolerance=0.05, consumer_bootstrap=200)
NE_OK = {"click": 0.8, "conversion": 0.9}


@pytest.fixture()
def production():
    return np.random.default_rng(0).normal(size=(64, 2, 16)).astype(np.float16)


def test_first_snapshot_is_judged_on_absolute_checks_only(production):
    v = judge(production, None, NE_OK, CFG)
    assert v.blessed and v.baseline_snapshot_id is None and v.shift == []
    assert any("first snapshot" in r for r in v.reasons)
    assert not any("mean_cosine" in c.name or "l2_change" in c.name for c in v.checks)  # no shift without a baseline


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
    unset = GateConfig(probe_users=64, warmup_promotions=1, min_embedding_std=1e-4, max_cosine_across_users=0.9,
                       min_label_count=30, not_measurable_without_production="hold", mode="both", consumer_holdout_users=0.1, consumer_max_ne_regression_pct=1.0,
                 consumer_worse_tolerance=0.05, consumer_bootstrap=200)  # no shift or NE thresholds
    v = judge(production, None, NE_OK, unset)
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


def test_a_task_with_one_label_class_is_not_measurable_not_failed_nor_silently_passed(production):
    # A small day's holdout without a conversion: NE of that task is undefined; it is its own outcome.
    why = "all 8 labels are negative (background entropy is 0)"
    ev = {"click": {"holdout_rows": 400, "positives": 90}, "conversion": {"holdout_rows": 8, "positives": 0}}
    first = judge(production, None, {"click": 0.8, "conversion": None}, CFG, unmeasured={"conversion": why},
                  ne_evidence=ev)
    assert not first.blessed  # a first promotion: nothing else vouches for the conversion head
    assert [(c.name, c.outcome) for c in first.checks if c.name.startswith("ne")] == [
        ("ne.click", "pass"), ("ne.conversion", "not_measurable")]
    line = next(r for r in first.reasons if r.startswith("ne.conversion not measurable"))
    assert f"{why} on today's holdout (0 positives in 8 holdout rows), needs >= 30 of each label" in line
    held = judge(production, production, {"click": 1.5, "conversion": None}, CFG, "sum-prev",
                 production_ne={"click": 0.8}, unmeasured={"conversion": why}, ne_evidence=ev)
    assert not held.blessed
    assert any(r.startswith("ne.click = 1.5, needs <= 1 (90 positives in 400") for r in held.reasons)
    # Without the reason, an undefined NE still fails: a None is never silently passed, whatever the holdout's size.
    assert not judge(production, None, {"click": 0.8, "conversion": None}, CFG).blessed
    few = {"click": ev["click"], "conversion": {"holdout_rows": 85, "positives": 2}}
    bless = CFG.model_copy(update={"not_measurable_without_production": "bless"})
    broken = judge(production, None, {"click": 0.8, "conversion": float("nan")}, bless, ne_evidence=few)
    assert not broken.blessed and {c.name: c.outcome for c in broken.checks}["ne.conversion"] == "fail"


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


# --- verdicts that know their evidence (issue 27 item 3) ---------------------------------------------------------

FEW = {"click": {"holdout_rows": 85, "positives": 2}, "conversion": {"holdout_rows": 85, "positives": 40}}
MANY = {"click": {"holdout_rows": 3000, "positives": 400}, "conversion": {"holdout_rows": 3000, "positives": 90}}


def _near_collapsed(n: int = 64, d: int = 16, seed: int = 9) -> np.ndarray:
    """``[n, 2, d]``: every user one shared direction (norm 10) plus a little noise of their own, so their mean
    pairwise cosine is ~0.9996 while the spread across users (~0.05) is far above ``min_embedding_std``."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(1, 2, d))
    shared *= 10 / np.linalg.norm(shared, axis=2, keepdims=True)
    return (shared + rng.normal(scale=0.052, size=(n, 2, d))).astype(np.float32)


def test_the_mean_pairwise_cosine_across_users_matches_the_all_pairs_mean():
    from validation.gate import mean_cosine_across_users

    x = np.random.default_rng(6).normal(loc=0.3, size=(50, 8))
    x[7] = 0.0  # a zero vector has no direction: left out
    kept = x[np.linalg.norm(x, axis=1) > 0]
    units = kept / np.linalg.norm(kept, axis=1, keepdims=True)
    cos = units @ units.T
    brute = (cos.sum() - np.trace(cos)) / (len(kept) * (len(kept) - 1))
    assert mean_cosine_across_users(x) == pytest.approx(brute, rel=1e-12)
    assert mean_cosine_across_users(np.ones((5, 8))) == pytest.approx(1.0)
    assert mean_cosine_across_users(np.zeros((5, 8))) is None


def test_a_near_collapsed_candidate_passes_the_absolute_spread_but_is_held_by_the_relative_check():
    from validation.gate import mean_cosine_across_users

    cand = _near_collapsed()
    assert 0.9995 < mean_cosine_across_users(cand[:, 0]) < 0.9997  # the case of the issue
    v = judge(cand, None, NE_OK, CFG, ne_evidence=MANY)
    assert not v.blessed
    spread = [c for c in v.checks if c.name.endswith("std_across_users")]
    assert spread and all(c.passed and c.value > 100 * CFG.min_embedding_std for c in spread)  # absolute: passes
    collapse = [c for c in v.checks if c.name.endswith("cosine_across_users")]
    assert [c.outcome for c in collapse] == ["fail", "fail"]
    assert any(r.startswith("embedding_0.cosine_across_users = 0.9996, needs <= 0.9 (64 probe users)")
               for r in v.reasons), v.reasons
    # Production near-identical to it does not vouch for it either: the collapse check is absolute to the candidate.
    assert not judge(cand, cand, NE_OK, CFG, "sum-prev", production_ne=NE_OK, ne_evidence=MANY).blessed


def test_normal_embeddings_pass_every_check_with_their_evidence_sizes(production):
    cand = production + np.random.default_rng(1).normal(scale=0.05, size=production.shape).astype(np.float16)
    v = judge(cand, production, NE_OK, CFG, "sum-prev", production_ne=NE_OK, ne_evidence=MANY)
    assert v.blessed, v.reasons
    assert all(c.outcome == "pass" for c in v.checks)
    collapse = [c for c in v.checks if c.name.endswith("cosine_across_users")]
    assert len(collapse) == 2 and all(abs(c.value) < 0.1 for c in collapse)
    by_name = {c.name: c.evidence for c in v.checks}
    assert by_name["ne.click"] == by_name["ne_regression.click"] == {"holdout_rows": 3000, "positives": 400}
    probe = {"probe_users": 64}
    assert by_name["embedding_1.pooled_mean_cosine"] == by_name["embedding_0.cosine_across_users"] == probe
    # Users sharing an offset as large as in normal simulated snapshots (mean pairwise cosine up to 0.21) pass.
    rng = np.random.default_rng(8)
    shared = rng.normal(size=(1, 2, 16))
    offset = (0.5 * shared / np.linalg.norm(shared, axis=2, keepdims=True) * np.sqrt(16) + rng.normal(size=(64, 2, 16)))
    v = judge(offset.astype(np.float16), None, NE_OK, CFG, ne_evidence=MANY)
    values = [c.value for c in v.checks if c.name.endswith("cosine_across_users")]
    assert v.blessed and all(0.15 < c < 0.35 for c in values), values


def test_an_ne_from_too_few_positives_is_not_measurable_and_holds_a_first_promotion_by_default(production):
    v = judge(production, None, NE_OK, CFG, ne_evidence=FEW)
    assert not v.blessed
    assert [(c.name, c.outcome) for c in v.checks if c.name.startswith("ne")] == [
        ("ne.click", "not_measurable"), ("ne.conversion", "pass")]
    assert not [c for c in v.checks if c.outcome == "fail"]  # held for want of evidence, not for a failed check
    line = next(r for r in v.reasons if r.startswith("ne.click not measurable"))
    assert line.startswith("ne.click not measurable: 2 positives in 85 holdout rows, needs >= 30 of each label")
    assert "its value 0.8 is not judged against <= 1" in line
    assert "held (gate.not_measurable_without_production: hold)" in line
    # One more positive than the minimum, in rows that hold as many negatives: measured.
    enough = {"click": {"holdout_rows": 85, "positives": 30}, "conversion": FEW["conversion"]}
    assert judge(production, None, NE_OK, CFG, ne_evidence=enough).blessed
    # The scarcer label may be the negatives (a task most rows are positive in): just as noisy.
    scarce_negatives = {"click": {"holdout_rows": 85, "positives": 80}, "conversion": FEW["conversion"]}
    v = judge(production, None, NE_OK, CFG, ne_evidence=scarce_negatives)
    assert not v.blessed and any("80 positives (5 negatives) in 85 holdout rows" in r for r in v.reasons)


def test_the_other_setting_blesses_a_first_promotion_on_its_other_checks(production):
    cfg = CFG.model_copy(update={"not_measurable_without_production": "bless"})
    v = judge(production, None, NE_OK, cfg, ne_evidence=FEW)
    assert v.blessed, v.reasons
    assert any(r.startswith("ne.click not measurable: 2 positives in 85 holdout rows") and
               "not held (gate.not_measurable_without_production: bless)" in r for r in v.reasons)
    # It blesses on the other checks only: a failed one still holds.
    assert not judge(production, None, {"click": 0.8, "conversion": 1.3}, cfg, ne_evidence=FEW).blessed


def test_with_production_a_not_measurable_ne_leaves_the_decision_to_the_shift_checks(production):
    small = production + np.random.default_rng(1).normal(scale=0.05, size=production.shape).astype(np.float16)
    v = judge(small, production, NE_OK, CFG, "sum-prev", production_ne={"click": 0.5, "conversion": 0.9},
              ne_evidence=FEW)
    assert v.blessed, v.reasons  # click NE 0.3 worse than production's, but on 2 positives: not judged
    assert {c.name: c.outcome for c in v.checks}["ne_regression.click"] == "not_measurable"
    assert any(r.startswith("ne_regression.click not measurable: 2 positives in 85 holdout rows") and
               "the shift checks against sum-prev on 64 probe users and the other checks decide" in r
               for r in v.reasons), v.reasons
    # ... and the shift checks do decide: a reinitialised candidate is held.
    reinit = np.random.default_rng(2).normal(size=production.shape).astype(np.float16)
    held = judge(reinit, production, NE_OK, CFG, "sum-prev", production_ne=NE_OK, ne_evidence=FEW)
    assert not held.blessed
    assert any(r.startswith("embedding_0.mean_cosine = ") and r.endswith("needs >= 0.8 (64 probe users)")
               for r in held.reasons)
    # During the warm-up the shift is not enforced: the line says so, and the measured checks decide.
    young = judge(reinit, production, NE_OK, CFG, "sum-prev", production_ne=NE_OK, ne_evidence=FEW,
                  enforce_shift=False)
    assert young.blessed and any("not enforced (warm-up) either" in r for r in young.reasons)


def test_failed_lines_name_threshold_and_evidence_and_unknown_sizes_are_said(production):
    v = judge(production, None, {"click": 1.5, "conversion": 0.9}, CFG, ne_evidence=MANY)
    assert "ne.click = 1.5, needs <= 1 (400 positives in 3000 holdout rows)" in v.reasons
    # A caller that does not count the holdout (sizes unknown): judged as before, and the verdict says so.
    unknown = judge(production, None, NE_OK, CFG)
    assert unknown.blessed and any(r.startswith("NE evidence sizes not given") for r in unknown.reasons)
    assert all(c.outcome == "pass" for c in unknown.checks)


def test_a_not_measurable_verdict_serialises_and_renders(production):
    import json

    from validation.gate import verdict_markdown, verdict_summary

    v = judge(production, None, NE_OK, CFG, ne_evidence=FEW).to_dict() | {"snapshot_id": "sum-2026-01-01"}
    back = json.loads(json.dumps(v, allow_nan=False))
    click = next(c for c in back["checks"] if c["name"] == "ne.click")
    assert click["outcome"] == "not_measurable" and click["evidence"] == {"holdout_rows": 85, "positives": 2}
    table = verdict_markdown(back)
    assert "| ne.click | 0.8 | <= 1 | 2 positives in 85 holdout rows | not measurable |" in table
    assert "| embedding_0.cosine_across_users |" in table and "| 64 probe users | yes |" in table
    assert "**SUM-2026-01-01: HELD**" in table.upper()
    assert verdict_summary(back, NE_OK)["not_measurable"] == ["ne.click"]
    # A verdict recorded before outcomes and evidence existed still renders.
    before = ("name", "value", "threshold", "op", "passed")
    old = {**back, "checks": [{k: c[k] for k in before} for c in back["checks"]]}
    assert "| ne.click | 0.8 | <= 1 | - | NO |" in verdict_markdown(old)


def _consumer(outcome: str, change: float = 0.0, name: str = "click") -> dict:
    """A consumer row as validation.consumers.measure_consumer returns it (to_dict)."""
    ci = None if outcome == "not_measurable" else [change - 0.5, change + 0.5]
    return {"consumer": name, "rows": 1500, "users": 150, "positives": 300 if outcome != "not_measurable" else 3,
            "ne": {"now": 0.9, "after": 0.9 * (1 + change / 100), "without": 0.95},
            "change_pct": None if outcome == "not_measurable" else change, "change_ci": ci, "worse_share": 0.01,
            "vs_without_pct": -5.0, "vs_without_ci": [-6.0, -4.0], "threshold_pct": 1.0, "outcome": outcome,
            "why": "NE worse by +8.00 % ... (gate.consumer_max_ne_regression_pct)" if outcome == "fail" else
            ("3 rows of the scarcer label" if outcome == "not_measurable" else ""), "model_day": "2026-01-02",
            "extra": {}}


def _near(production):
    return production + np.random.default_rng(1).normal(scale=0.05, size=production.shape).astype(np.float16)


def _far(production):
    return np.random.default_rng(2).normal(size=production.shape).astype(np.float16)


def test_a_consumer_that_regresses_holds_a_candidate_the_proxies_pass(production):
    v = judge(_near(production), production, NE_OK, CFG, "sum-prev", consumers=[_consumer("fail", 8.0)])
    assert not v.blessed
    [check] = [c for c in v.checks if c.name == "consumer.click.ne_change_pct"]
    assert check.outcome == "fail" and check.enforced and check.evidence["users"] == 150
    assert any(r.startswith("consumer click: NE +8.00 %") and "150 users" in r for r in v.reasons)
    assert v.to_dict()["consumers"][0]["consumer"] == "click"


def test_consumers_mode_blesses_a_shift_the_consumers_do_not_feel_and_reports_the_shift(production):
    consumers_mode = CFG.model_copy(update={"mode": "consumers"})
    v = judge(_far(production), production, NE_OK, consumers_mode, "sum-prev", consumers=[_consumer("pass", 0.1)])
    assert v.blessed, v.reasons
    shift = [c for c in v.checks if c.name == "embedding_0.mean_cosine"]
    assert shift and shift[0].outcome == "fail" and not shift[0].enforced
    assert any("embedding_0.mean_cosine" in r and "not enforced: gate.mode" in r for r in v.reasons)
    # The same candidate in both modes: the shift holds it.
    assert not judge(_far(production), production, NE_OK, CFG, "sum-prev", consumers=[_consumer("pass", 0.1)]).blessed


def test_with_no_consumer_yet_the_proxies_decide_and_the_verdict_says_so(production):
    consumers_mode = CFG.model_copy(update={"mode": "consumers"})
    for consumers in ([], [_consumer("not_measurable")]):
        v = judge(_far(production), production, NE_OK, consumers_mode, "sum-prev", consumers=consumers)
        assert not v.blessed and any(r.startswith("embedding_0.mean_cosine") for r in v.reasons)
        assert any("the proxies decide (gate.mode: consumers)" in r for r in v.reasons)
    # No consumer check run at all (a replay of the proxies): the proxies decide, and no line claims otherwise.
    v = judge(_far(production), production, NE_OK, consumers_mode, "sum-prev")
    assert not v.blessed and not any("consumer" in r for r in v.reasons)


def test_proxies_mode_reports_a_regressing_consumer_without_holding(production):
    proxies = CFG.model_copy(update={"mode": "proxies"})
    v = judge(_near(production), production, NE_OK, proxies, "sum-prev", consumers=[_consumer("fail", 8.0)])
    assert v.blessed, v.reasons
    assert any("consumer.click.ne_change_pct" in r and "not enforced" in r for r in v.reasons)


def test_the_verdict_table_shows_the_consumer_table(production):
    from validation.gate import verdict_markdown

    v = judge(_near(production), production, NE_OK, CFG, "sum-prev",
              consumers=[_consumer("fail", 8.0), _consumer("not_measurable", name="conversion")])
    table = verdict_markdown(v.to_dict() | {"snapshot_id": "sum-x"})
    assert "| consumer | NE now | NE after |" in table
    assert "| click | 0.9 | 0.972 | +8.00 [+7.50, +8.50] | 1.0 % | -5.00 [-6.00, -4.00] |" in table
    assert "| conversion |" in table and "not measurable |" in table
