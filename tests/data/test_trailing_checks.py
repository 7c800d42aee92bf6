"""The checks relative to the trailing validated days: normal simulated days pass with a margin, the first
day skips them (and says so), only passing days become baselines, and the bounds follow the history."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from validation.corruptions import CATALOGUE, CorruptionContext
from validation.data_checks import DataValidationError, validate_day
from validation.profiles import load_history, profile_path, quantile_partition, trailing_plan
from validation.suites import build_trailing_suite


def test_first_day_skips_the_trailing_checks_and_says_so(history):
    for report in history.reports[history.days[0]]:
        assert report.success
        assert any("trailing checks" in line and "no validated day before" in line for line in report.skipped)
        assert report.baseline == {} and report.observed == {}


def test_normal_simulated_days_pass_with_margin(history, params):
    """The simulator's normal days (users drift, 100 new users a day, events grow) pass every check."""
    cfg = params.validation
    for i, ds in enumerate(history.days[1:], start=1):
        reports = {r.kind: r for r in history.reports[ds]}
        for kind, report in reports.items():
            assert report.success and not report.warnings, report.summary()
            assert report.baseline["previous_day"] == history.days[i - 1]
            assert report.baseline["trailing_days"] == history.days[max(0, i - cfg.trailing_days):i]
            kls = {k: v for k, v in report.observed.items() if k.startswith("kl_divergence")}
            assert kls and all(v is not None for v in kls.values())
            # Calibrated margin: normal drift stays below half of the threshold (observed max ~0.013 vs 0.05).
            assert max(kls.values()) < 0.5 * min(cfg.drift_max_kl, cfg.sparse_length_max_kl), kls
        events = reports["events"]
        assert {"label_rate(click)", "label_rate(conversion)", "row_count"} <= set(events.observed)
        assert {k for k in reports["users"].observed if k.startswith("kl_divergence(")} >= {
            "kl_divergence(sessions_7d)", "kl_divergence(liked_pages__len)"}


def test_profiles_are_written_for_validated_days_only(history):
    for ds in history.days:
        profile = json.loads(profile_path(history.root, ds).read_text())
        assert profile["ds"] == ds and set(profile) >= {"events", "users", "version"}
        assert profile["events"]["rows"] > 0 and 0 < profile["events"]["label_rates"]["click"] < 1
        assert len(profile["users"]["partitions"]) >= 8
    # Only days strictly before a date count, so rerunning an old date sees the baseline it saw first.
    assert [p["ds"] for p in load_history(history.root, history.days[3], 7)] == history.days[:3]
    assert [p["ds"] for p in load_history(history.root, history.next_ds, 2)] == history.days[-2:]


def test_a_bad_day_never_becomes_a_baseline(spec, params, sim_day, history, workspace_with_history, builder):
    root, bad = workspace_with_history, history.next_ds
    after = str((np.datetime64(bad) + np.timedelta64(1, "D")).astype(str))
    events, users = CATALOGUE["label_rate_collapse"].apply(*sim_day(bad), CorruptionContext(bad, spec))
    builder.write_partition(events, root / "data" / "events" / f"ds={bad}")
    builder.write_partition(users, root / "data" / "users" / f"ds={bad}")
    with pytest.raises(DataValidationError):
        validate_day(bad, root, spec, params, gx_root=history.gx_root)
    assert not profile_path(root, bad).exists()

    # The next day is compared with the last *validated* day, not with the bad one.
    for kind, frame in zip(("events", "users"), sim_day(after)):
        builder.write_partition(frame, root / "data" / kind / f"ds={after}")
    reports = validate_day(after, root, spec, params, gx_root=history.gx_root)
    assert all(r.success for r in reports)
    assert reports[0].baseline["previous_day"] == history.days[-1]
    assert bad not in reports[0].baseline["trailing_days"]


def test_a_failing_rerun_withdraws_the_days_profile(spec, params, sim_day, history, workspace_with_history, builder):
    root, ds = workspace_with_history, history.next_ds
    events, users = sim_day(ds)
    builder.write_partition(events, root / "data" / "events" / f"ds={ds}")
    builder.write_partition(users, root / "data" / "users" / f"ds={ds}")
    validate_day(ds, root, spec, params, gx_root=history.gx_root)
    assert profile_path(root, ds).exists()
    events, users = CATALOGUE["row_count_drop"].apply(events, users, CorruptionContext(ds, spec))
    builder.write_partition(events, root / "data" / "events" / f"ds={ds}")
    with pytest.raises(DataValidationError, match=r"expect_table_row_count_to_be_between\(table\)"):
        validate_day(ds, root, spec, params, gx_root=history.gx_root)
    assert not profile_path(root, ds).exists()


# ---------------------------------------------------------------------------------------------
# Pure functions: plans, partitions
# ---------------------------------------------------------------------------------------------
def _profiles(history, n: int = 3) -> list[dict]:
    return load_history(history.root, history.next_ds, n)


def test_trailing_plan_bounds_follow_the_history(spec, params, history):
    profiles = _profiles(history)
    cfg = params.validation
    plan = trailing_plan("events", profiles, spec, params)
    rows = float(np.median([p["events"]["rows"] for p in profiles]))
    assert plan.parameters["trailing_rows_min"] == math.ceil(rows * cfg.row_count_min_ratio)
    assert plan.parameters["trailing_rows_max"] == math.floor(rows * cfg.row_count_max_ratio)
    mean = float(np.mean([p["events"]["label_rates"]["click"] for p in profiles]))
    assert plan.parameters["trailing_rate_min__click"] == pytest.approx(mean * (1 - cfg.label_rate_max_relative_change))
    assert plan.parameters["trailing_rate_max__click"] == pytest.approx(mean * (1 + cfg.label_rate_max_relative_change))
    assert plan.drift == list(spec.ad_dense) and plan.labels == list(spec.labels) and plan.stuck
    assert plan.baseline == {"previous_day": profiles[-1]["ds"], "trailing_days": [p["ds"] for p in profiles]}
    partition = plan.parameters["previous_partition__ad_price"]
    assert partition["bins"][0] == -math.inf and partition["bins"][-1] == math.inf
    suite = build_trailing_suite("events", spec, params, plan)
    assert suite.name == "sum_events_trailing"
    types = [e.expectation_type for e in suite.expectations]
    assert types.count("expect_column_kl_divergence_to_be_less_than") == len(spec.ad_dense)
    assert types.count("expect_column_mean_to_be_between") == len(spec.labels)
    assert trailing_plan("users", [], spec, params) is None


def test_a_feature_without_a_baseline_is_skipped_not_failed(spec, params, history):
    profiles = _profiles(history)
    name = spec.user_dense[0]
    del profiles[-1]["users"]["partitions"][name]  # e.g. a feature added today
    plan = trailing_plan("users", profiles, spec, params)
    assert name not in plan.drift and f"{spec.user_dense[1]}" in plan.drift
    assert any(name in line and "no distribution" in line for line in plan.skipped)


def test_stuck_check_can_be_switched_off_per_partition_type(spec, params, history):
    relaxed = params.model_copy(update={"validation": params.validation.model_copy(update={"stuck_check_kinds": ["events"]})})
    assert trailing_plan("users", _profiles(history), spec, relaxed).stuck is False
    assert trailing_plan("events", _profiles(history), spec, relaxed).stuck is True


def test_quantile_partition_has_no_empty_bin():
    rng = np.random.default_rng(0)
    part = quantile_partition(rng.normal(size=5000), 10)
    assert len(part["weights"]) == 10 and math.isclose(sum(part["weights"]), 1.0)
    assert min(part["weights"]) > 0.08
    # A heavy minimum (many empty lists): the empty first bin is merged away.
    lengths = np.concatenate([np.zeros(400), rng.poisson(4, size=600)])
    part = quantile_partition(lengths, 10)
    assert min(part["weights"]) > 0 and part["bins"][0] == -math.inf and part["bins"][1] > 0
    assert quantile_partition([np.nan, np.inf], 10) is None
    constant = quantile_partition(np.ones(100), 10)
    assert constant["weights"] == [1.0]


def test_label_rate_bounds_widen_to_the_sampling_noise_of_a_small_day():
    from validation.profiles import label_rate_bounds

    # ~21k rows (the simulator): the relative bound is the wider one and applies unchanged.
    assert label_rate_bounds(0.07, 21_000, 0.25, 4.0) == pytest.approx((0.0525, 0.0875))
    # 100 rows: 4 binomial standard errors of a 0.5 rate (0.2) are wider than 25% of it (0.125).
    assert label_rate_bounds(0.5, 100, 0.25, 4.0) == pytest.approx((0.3, 0.7))
    assert label_rate_bounds(0.5, None, 0.25, 4.0) == pytest.approx((0.375, 0.625))


def test_rare_extreme_values_fail_naming_the_column_the_share_and_examples(
        spec, params, sim_day, history, workspace_with_history, builder):
    """6 of ~1,900 users at 1e12: finite (the contract passes) and 0.3 % of the rows (no KL bin moves), so only
    the extreme-values check sees them; its line says which column, how many, and shows the values."""
    root, ds = workspace_with_history, history.next_ds
    events, users = CATALOGUE["rare_extreme_dense"].apply(*sim_day(ds), CorruptionContext(ds, spec, seed=4))
    column = spec.user_dense[0]
    bad = int((users[column] == 1e12).sum())
    assert bad == round(0.003 * len(users)) and bad >= 5
    builder.write_partition(events, root / "data" / "events" / f"ds={ds}")
    builder.write_partition(users, root / "data" / "users" / f"ds={ds}")
    with pytest.raises(DataValidationError) as info:
        validate_day(ds, root, spec, params, gx_root=history.gx_root, data_docs=False)
    report = {r.kind: r for r in info.value.reports}["users"]
    assert report.failed == [line for line in report.failed if "extreme values" in line]  # the only check failing
    (line,) = report.failed
    assert f"extreme values of {column!r}: {bad} of {len(users)} values ({bad / len(users):.2%})" in line
    assert "e.g. 1e+12, 1e+12" in line and "range of 6 validated day(s)" in line
    assert report.observed[f"extreme_share({column})"] == pytest.approx(bad / len(users))
    assert report.observed[f"kl_divergence({column})"] < params.validation.drift_max_kl  # what the KL check saw


def test_extreme_values_check_starts_after_enough_validated_days_and_normal_days_pass_it(history, params):
    cfg = params.validation
    for i, ds in enumerate(history.days):
        users = {r.kind: r for r in history.reports[ds]}["users"]
        shares = {k: v for k, v in users.observed.items() if k.startswith("extreme_share(")}
        if i < cfg.extreme_min_days:
            assert not shares
            if i:
                assert any("extreme values" in s and "extreme_min_days" in s for s in users.skipped)
        else:
            assert shares and set(shares.values()) == {0.0}, shares


def test_extreme_bounds_widen_the_days_envelope():
    from validation.profiles import extreme_bounds, tail_quantiles

    assert extreme_bounds([[0.0, 10.0], [-2.0, 8.0]], 3.0) == (-38.0, 46.0, -2.0, 10.0)
    # A constant column: its width counts as max(|value|, 1), never zero.
    assert extreme_bounds([[5.0, 5.0]], 2.0) == (-5.0, 15.0, 5.0, 5.0)
    assert extreme_bounds([[0.0, 0.0]], 3.0)[:2] == (-3.0, 3.0)
    values = np.concatenate([np.arange(1000, dtype=float), [np.inf, np.nan]])
    lo, hi = tail_quantiles(values, 0.001)
    assert lo == pytest.approx(0.999) and hi == pytest.approx(998.001)
    assert tail_quantiles([np.nan], 0.001) is None
