"""The study's statistics: paired per-seed contrasts, their intervals, and verdicts read from the interval alone.

Every case is built from measurements whose answer is known: an arm's NE is the baseline's times
``1 + diff / 100``, so the paired % NE diff of a seed is exactly ``diff``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sum_pipeline.study_stats import (DOES_NOT_HOLD, HOLDS, NOT_MEASURABLE, UNDETERMINED, all_of, bootstrap_interval,
                                      ratio_interval, t_interval, t_value, tables, verdict)

MODELS = ("click", "conversion", "inbox")
POOLED = ("async", "realtime")


def measurements(diffs: dict[str, list[float]], models=MODELS, subsets=("all",), windows=("eval",),
                 units=("snapshot", "write"), base=lambda seed: 0.8 + 0.02 * seed) -> list[dict]:
    """NE records: per seed, each arm's NE is ``base(seed) * (1 + diff / 100)`` in every model, subset, window.

    ``diffs[arm][i]`` is seed i's paired % NE diff vs no SUM; the baseline varies a lot between seeds (a seed
    effect an unpaired comparison would have to absorb), the diff does not.
    """
    n_seeds = len(next(iter(diffs.values())))
    out = []
    for seed in range(n_seeds):
        for model in models:
            for subset in subsets:
                for window in windows:
                    ne0 = base(seed)
                    out.append({"seed": seed, "model": model, "arm": "none", "pool_unit": None, "window": window,
                                "subset": subset, "ne": ne0, "n": 500})
                    for arm, d in diffs.items():
                        for unit in (units if arm in POOLED else (None,)):
                            out.append({"seed": seed, "model": model, "arm": arm, "pool_unit": unit,
                                        "window": window, "subset": subset, "ne": ne0 * (1 + d[seed] / 100), "n": 500})
    return out


def direction(result: dict, starts: str, unit: str | None = None) -> dict:
    [d] = [d for d in result["directions"]
           if d["claim"].startswith(starts) and (unit is None or d["pool_unit"] == unit)]
    return d


# ------------------------------------------------------------------------------------------ intervals

def test_t_value_for_ten_seeds_has_nine_degrees_of_freedom():
    assert t_value(10) == pytest.approx(2.2622, abs=1e-4)
    assert t_value(3) == pytest.approx(4.3027, abs=1e-4)


def test_t_interval_of_three_seeds():
    # mean 2, standard error 1/sqrt(3), t(0.975, 2 d.o.f.) = 4.303: half width 2.484
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert lo == pytest.approx(2 - 2.4841, abs=1e-3) and hi == pytest.approx(2 + 2.4841, abs=1e-3)


def test_t_interval_of_ten_seeds():
    values = [float(v) for v in range(10)]  # mean 4.5, sd 3.028
    half = 2.2622 * np.std(values, ddof=1) / math.sqrt(10)
    assert t_interval(values) == pytest.approx([4.5 - half, 4.5 + half], abs=1e-3)


def test_a_rank_interval_stays_within_one_and_the_feature_count():
    assert t_interval([1.0, 2.0, 3.0], lower=1, upper=3) == [1, 3]
    assert t_interval([2.0, 2.0, 2.0], lower=1, upper=9) == [2.0, 2.0]


def test_no_interval_from_a_single_seed_or_missing_values():
    assert t_interval([0.5]) is None
    assert t_interval([0.5, None, float("nan")]) is None
    assert bootstrap_interval([0.5]) is None


def test_bootstrap_is_reproducible_and_narrower_than_its_range():
    values = [-1.3, -1.2, -1.24, -1.1, -1.35, -1.28, -1.19, -1.22, -1.31, -1.15]
    first, second = bootstrap_interval(values), bootstrap_interval(values)
    assert first == second
    assert min(values) < first[0] < np.mean(values) < first[1] < max(values)


# -------------------------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize("ci, claimed, expected", [
    ([-2.0, -0.5], "below", HOLDS),
    ([-0.5, 0.3], "below", UNDETERMINED),
    ([0.2, 1.0], "below", DOES_NOT_HOLD),
    ([0.2, 1.0], "above", HOLDS),
    ([-1.0, -0.2], "above", DOES_NOT_HOLD),
    ([-0.5, 0.0], "below", UNDETERMINED),  # touching the boundary is not wholly on the claimed side
    (None, "below", NOT_MEASURABLE),
])
def test_verdict_reads_the_interval(ci, claimed, expected):
    assert verdict(ci, claimed) == expected


def test_verdict_against_a_threshold():
    assert verdict([0.6, 0.9], "above", 0.5) == HOLDS
    assert verdict([0.4, 0.9], "above", 0.5) == UNDETERMINED
    assert verdict([0.1, 0.4], "above", 0.5) == DOES_NOT_HOLD


def test_every_part_must_hold_and_one_refutation_suffices():
    assert all_of([HOLDS, HOLDS]) == HOLDS
    assert all_of([HOLDS, UNDETERMINED]) == UNDETERMINED
    assert all_of([HOLDS, DOES_NOT_HOLD, UNDETERMINED]) == DOES_NOT_HOLD
    assert all_of([NOT_MEASURABLE, NOT_MEASURABLE]) == NOT_MEASURABLE
    assert all_of([]) == NOT_MEASURABLE


# ---------------------------------------------------------------------------------- paired contrasts

TEN = 10


def _arms(async_diffs: list[float]) -> dict[str, list[float]]:
    """Per seed diffs vs no SUM: frozen -1, offline -2, offline without AP -0.8, realtime 0.1 ahead of async."""
    n = len(async_diffs)
    return {"frozen": [-1.0] * n, "offline": [-2.0] * n, "offline_raw": [-0.8] * n,
            "async": async_diffs, "realtime": [d - 0.1 for d in async_diffs]}


def _table1_click(result: dict) -> dict:
    [row] = [r for r in result["table1"] if r["model"] == "click" and r["subset"] == "all"]
    return row


def test_a_contrast_wholly_below_zero_holds():
    result = tables({"measurements": measurements(_arms([-1.0 - 0.05 * (i % 3) for i in range(TEN)]))})
    row = _table1_click(result)
    assert row["ne_diff"]["ci"][1] < 0 and row["verdict"] == HOLDS
    assert row["ne_diff"]["n_seeds"] == TEN
    assert [p["value"] for p in row["ne_diff"]["per_seed"]] == pytest.approx(
        [-1.0 - 0.05 * (i % 3) for i in range(TEN)])
    assert direction(result, "SUM embeddings lower every")["verdict"] == HOLDS


def test_a_contrast_wholly_above_zero_does_not_hold():
    result = tables({"measurements": measurements(_arms([0.8 + 0.05 * (i % 3) for i in range(TEN)]))})
    assert _table1_click(result)["verdict"] == DOES_NOT_HOLD
    d = direction(result, "SUM embeddings lower every")
    assert d["verdict"] == DOES_NOT_HOLD and d["holds"] is False


def test_a_contrast_straddling_zero_is_undetermined_whatever_its_point_estimate():
    # Mean clearly negative (-0.51), as is most seeds' value, but the interval straddles zero.
    negative_mean = [-3.0, 2.0, -2.5, 1.5, -2.0, 2.5, -3.0, 1.0, -1.5, -0.1]
    assert np.mean(negative_mean) < 0 and sum(v < 0 for v in negative_mean) > TEN / 2
    result = tables({"measurements": measurements(_arms(negative_mean))})
    row = _table1_click(result)
    assert row["ne_diff"]["mean"] < 0 and row["ne_diff"]["ci"][0] < 0 < row["ne_diff"]["ci"][1]
    assert row["verdict"] == UNDETERMINED
    d = direction(result, "SUM embeddings lower every")
    assert d["verdict"] == UNDETERMINED and d["holds"] is None
    # Mirrored: a positive point estimate does not make it "does not hold" either.
    result = tables({"measurements": measurements(_arms([-v for v in negative_mean]))})
    assert _table1_click(result)["ne_diff"]["mean"] > 0 and _table1_click(result)["verdict"] == UNDETERMINED


def test_one_seed_is_not_measurable():
    result = tables({"measurements": measurements({k: v[:1] for k, v in _arms([-1.0] * TEN).items()})})
    row = _table1_click(result)
    assert row["ne_diff"]["mean"] == pytest.approx(-1.0) and row["ne_diff"]["ci"] is None
    assert row["verdict"] == NOT_MEASURABLE
    assert {d["verdict"] for d in result["directions"] if d["table"] in ("1", "2", "4")} == {NOT_MEASURABLE}


def test_pairing_removes_the_seed_effect():
    # Baseline NE varies 0.6 .. 1.5 between seeds; async is 0.2 % better in every seed: the paired contrast holds.
    diffs = _arms([-0.2] * TEN)
    result = tables({"measurements": measurements(diffs, base=lambda s: 0.6 + 0.1 * s)})
    row = _table1_click(result)
    assert row["ne_diff"]["mean"] == pytest.approx(-0.2) and row["verdict"] == HOLDS
    unpaired = t_interval([p["ne_with"] for p in row["per_seed"]])
    assert unpaired[1] - unpaired[0] > 0.1  # the arms' own spreads, which an unpaired comparison would face


# ------------------------------------------------------------------------------------------- Table 2

def test_table2_under_both_pool_units_with_the_between_mode_contrasts():
    diffs = _arms([-2.5] * TEN)
    diffs["async"] = [-2.5 + 0.01 * i for i in range(TEN)]
    result = tables({"measurements": measurements(diffs)})
    rows = {(r["mode"], r["pool_unit"]) for r in result["table2"]}
    assert rows == {("frozen", None), ("offline", None), ("realtime", "snapshot"), ("realtime", "write"),
                    ("async", "snapshot"), ("async", "write")}
    between = {(c["arm"], c["ref"], c["pool_unit"]) for c in result["contrasts"]["paired"]
               if c["table"] == 2 and c["ref"] != "none"}
    assert between == {("offline", "offline_raw", None), ("offline", "frozen", None),
                       ("async", "offline", "snapshot"), ("async", "offline", "write"),
                       ("realtime", "async", "snapshot"), ("realtime", "async", "write"),
                       ("async", "frozen", "snapshot"), ("async", "frozen", "write")}
    c = next(c for c in result["contrasts"]["paired"]
             if (c["arm"], c["ref"], c["pool_unit"]) == ("async", "offline", "write"))
    # 100 * (NE_async - NE_offline) / NE_offline with NE_x = NE_none * (1 + d_x / 100)
    expected = [100 * ((1 + d / 100) / (1 - 2.0 / 100) - 1) for d in diffs["async"]]
    assert [p["value"] for p in c["per_seed"]] == pytest.approx(expected)
    for unit in ("snapshot", "write"):
        assert direction(result, "serving modes order", unit)["verdict"] == HOLDS


def test_the_chain_fails_on_one_link_wholly_against_it():
    diffs = _arms([-1.5 + 0.02 * (i % 2) for i in range(TEN)])  # async behind offline (-2.0) in every seed
    result = tables({"measurements": measurements(diffs)})
    d = direction(result, "serving modes order", "snapshot")
    assert d["verdict"] == DOES_NOT_HOLD and "async vs offline" in d["evidence"]


def test_share_of_realtimes_gain_kept_reads_fiellers_interval():
    rng = np.random.default_rng(3)
    realtime = list(-2.0 + 0.1 * rng.standard_normal(TEN))
    diffs = _arms([0.0] * TEN)
    diffs["realtime"] = realtime
    diffs["async"] = [0.9 * r + 0.05 * rng.standard_normal() for r in realtime]
    result = tables({"measurements": measurements(diffs, units=("snapshot",))})
    [share] = result["contrasts"]["shares"]
    assert share["share"] == pytest.approx(np.mean(diffs["async"]) / np.mean(realtime))
    assert share["ci"][0] < share["share"] < share["ci"][1] and share["ci"][0] > 0.5
    assert share["verdict"] == HOLDS == direction(result, "async keeps most")["verdict"]
    # Async keeps nothing: wholly below a majority.
    diffs["async"] = [0.05 * rng.standard_normal() for _ in realtime]
    result = tables({"measurements": measurements(diffs, units=("snapshot",))})
    assert direction(result, "async keeps most")["verdict"] == DOES_NOT_HOLD


def test_no_share_is_claimed_when_realtime_gains_nothing_established():
    diffs = _arms([0.0] * TEN)
    diffs["realtime"] = [(-1) ** i * 0.5 for i in range(TEN)]  # realtime's gain straddles zero
    diffs["async"] = [0.9 * r for r in diffs["realtime"]]
    result = tables({"measurements": measurements(diffs, units=("snapshot",))})
    [share] = result["contrasts"]["shares"]
    assert share["ci"] is None and share["verdict"] == UNDETERMINED


def test_no_share_of_a_gain_when_realtime_harms():
    # Both arms worse than no SUM: async "keeps 95 %" of a loss, which is no gain kept.
    diffs = _arms([0.0] * TEN)
    diffs["realtime"] = [3.0 + 0.1 * (i % 3) for i in range(TEN)]
    diffs["async"] = [0.95 * r for r in diffs["realtime"]]
    result = tables({"measurements": measurements(diffs, units=("snapshot",))})
    [share] = result["contrasts"]["shares"]
    assert share["share"] == pytest.approx(0.95) and share["ci"][0] > 0.5
    assert share["verdict"] == UNDETERMINED


def test_fiellers_interval_agrees_with_the_linear_contrast():
    # q is inside Fieller's interval exactly when the t interval of (num - q * den) contains zero.
    rng = np.random.default_rng(7)
    den = list(-2.0 + 0.3 * rng.standard_normal(TEN))
    num = [0.7 * d + 0.2 * rng.standard_normal() for d in den]
    ratio, (lo, hi) = ratio_interval(num, den)
    for q in (lo - 0.01, lo + 0.01, ratio, hi - 0.01, hi + 0.01):
        ci = t_interval([a - q * b for a, b in zip(num, den)])
        assert (ci[0] <= 0 <= ci[1]) == (lo <= q <= hi), q


# ------------------------------------------------------------------------------------------ Tables 3-4

def test_table3_direction_from_paired_per_seed_differences():
    shift = [{"seed": s, "embedding": e, "pooling": k, "cosine": 0.6 + 0.1 * k + 0.01 * s,
              "l2_change": 0.3 / k + 0.01 * s, "part": part}
             for s in range(4) for e in (0, 1) for k in (1, 2, 3) for part in ("total", "snapshot", "features")]
    result = tables({"shift": shift})
    t3 = result["table3"]
    assert {(r["embedding"], r["pooling"], r["part"]) for r in t3["rows"]} == {
        (e, k, p) for e in (0, 1) for k in (1, 2, 3) for p in ("total", "snapshot", "features")}
    row = next(r for r in t3["rows"] if (r["embedding"], r["pooling"], r["part"]) == (0, 1, "total"))
    assert row["cosine"]["mean"] == pytest.approx(0.715) and row["cosine"]["ci"] is not None
    [e0, _] = t3["ap_vs_raw"]
    assert e0["cosine"]["mean"] == pytest.approx(0.2) and e0["cosine"]["verdict"] == HOLDS
    assert e0["l2_change"]["mean"] == pytest.approx(-0.2) and e0["l2_change"]["verdict"] == HOLDS
    d = direction(result, "average pooling")
    assert d["verdict"] == HOLDS and "by construction" in d["claim"]


def test_table4_has_the_early_and_eval_windows_and_the_ap_effect():
    diffs = _arms([-2.0] * TEN)
    diffs["offline_raw"] = [-0.8 + 0.1 * (i % 2) for i in range(TEN)]
    result = tables({"measurements": measurements(diffs, windows=("eval", "early"))})
    rows = {r["setting"]: r for r in result["table4"]}
    assert set(rows) == {"no_ap", "ap3", "ap_effect"}
    assert all("train" not in key for r in result["table4"] for key in r)
    assert rows["no_ap"]["early_ne_diff"]["mean"] == pytest.approx(-0.75)
    assert rows["ap3"]["eval_ne_diff"]["mean"] == pytest.approx(-2.0)
    ap = rows["ap_effect"]["eval_ne_diff"]
    assert (ap["arm"], ap["ref"]) == ("offline", "offline_raw") and ap["verdict"] == HOLDS
    assert direction(result, "with AP(3)")["verdict"] == HOLDS


# --------------------------------------------------------------------------------- subsets, FI, misc

def test_covered_and_returning_subsets_get_their_own_rows():
    result = tables({"measurements": measurements(_arms([-1.0] * 3), subsets=("all", "covered", "returning"))})
    assert {r["subset"] for r in result["table1"]} == {"all", "covered", "returning"}
    assert {r["subset"] for r in result["table2"]} == {"all", "covered", "returning"}
    # Directions are read on all impressions only.
    assert "covered" not in direction(result, "SUM embeddings lower every")["evidence"]


def test_fi_rank_interval_is_clipped_to_the_feature_count():
    fi = [{"seed": s, "model": m, "rank": r, "n_features": 5} for m in MODELS for s, r in enumerate([1, 5, 1, 5])]
    result = tables({"measurements": measurements(_arms([-1.0] * 4)), "fi_rank": fi})
    rank = _table1_click(result)["fi_rank"]
    assert rank["mean"] == 3 and rank["ci"][0] == 1 and rank["ci"][1] == 5
    assert direction(result, "the SUM embeddings rank")["verdict"] == UNDETERMINED


def test_table1_is_reported_under_servings_pool_unit():
    diffs = _arms([-1.0, -1.1, -0.9])
    records = measurements(diffs)
    assert {r["pool_unit"] for r in tables({"measurements": records})["table1"]} == {"snapshot"}
    result = tables({"measurements": records, "choices": {"serving_pool_unit": "write"}})
    assert {r["pool_unit"] for r in result["table1"]} == {"write"}


def test_a_missing_ne_leaves_that_seed_out():
    records = measurements(_arms([-1.0, -1.1, -0.9, -1.0]), models=("click",))
    for r in records:
        if r["seed"] == 2 and r["arm"] == "async":
            r["ne"] = None
    row = _table1_click(tables({"measurements": records}))
    assert row["ne_diff"]["n_seeds"] == 3 and row["per_seed"][2]["ne_diff_pct"] is None


def test_two_measurements_of_one_thing_are_an_error():
    records = measurements(_arms([-1.0] * 2))
    with pytest.raises(ValueError, match="two measurements"):
        tables({"measurements": records + records[:1]})


def test_nothing_measured_gives_empty_tables_and_unmeasurable_directions():
    result = tables({})
    assert result["table1"] == [] and result["table2"] == [] and result["table4"] == []
    assert {d["verdict"] for d in result["directions"]} == {NOT_MEASURABLE}
