"""The simulator's world (sum_platform/simulate.py): independent worlds per seed, per-user propensities, sticky
features and intra-day feature updates; and the point-in-time join that reads the users time series."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sum_platform.config import load_params, load_profile
from sum_platform.simulate import FieldSpec, World, day_to_day_overlap, simulate_day, simulation_seed, world_on
from sum_platform.sources import joined_day

FIELDS = [
    FieldSpec("score_a", sparse=False),
    FieldSpec("score_b", sparse=False),
    FieldSpec("clicked_ad_categories", sparse=True, hash_size=64, mean_length=4),
    FieldSpec("pages", sparse=True, hash_size=300, mean_length=6),
]
DAYS = [f"2026-01-{d:02d}" for d in range(1, 7)]
STUDY = load_profile("study").simulator


def _params(seed: int | None = None, **simulator):
    """The base params with a small world (and the given simulator knobs)."""
    p = load_params()
    sim = p.simulator.model_copy(update={"initial_users": 400, "new_users_per_day": 20, "seed": seed, **simulator})
    return p.model_copy(update={"simulator": sim})


def _sticky(**extra):
    keys = ("click_propensity_sd", "conversion_propensity_sd", "dense_ema_weight", "list_turnover")
    return _params(**{**{k: getattr(STUDY, k) for k in keys}, **extra})


def _snapshot(users: pd.DataFrame) -> pd.DataFrame:
    return users[users["event_ts"] == users["event_ts"].min()].set_index("user_id")


def _overlap(params) -> dict[str, float]:
    """Mean day-to-day Jaccard of each list and correlation of each dense feature, same users, over DAYS."""
    return day_to_day_overlap(DAYS, params, FIELDS)


def _equal_frames(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for c in a.columns:
        if a[c].dtype == object:
            assert all(np.array_equal(x, y) for x, y in zip(a[c], b[c])), c
        else:
            pd.testing.assert_series_equal(a[c], b[c])


# --- independent worlds ----------------------------------------------------------------------------------------


def test_the_world_seed_defaults_to_the_params_seed_and_draws_an_independent_world():
    base = _params()
    assert simulation_seed(base) == base.seed
    same = _params(seed=base.seed)
    _equal_frames(simulate_day(DAYS[1], base, FIELDS)[0], simulate_day(DAYS[1], same, FIELDS)[0])
    other = simulate_day(DAYS[1], _params(seed=base.seed + 1), FIELDS)[0]
    assert not other["click"].reset_index(drop=True).equals(simulate_day(DAYS[1], base, FIELDS)[0]["click"])
    # Only the world's seed decides the data: the platform seed (model initialisation) does not.
    moved = same.model_copy(update={"seed": base.seed + 5})
    _equal_frames(simulate_day(DAYS[1], moved, FIELDS)[1], simulate_day(DAYS[1], base, FIELDS)[1])


@pytest.mark.parametrize("params", [_params(), _sticky(intraday_updates=True)], ids=["memoryless", "study"])
def test_a_day_is_the_same_whether_reached_day_by_day_or_directly(params):
    for ds in DAYS[:4]:
        simulate_day(ds, params, FIELDS)  # the cached world advances day by day
    cached = simulate_day(DAYS[4], params, FIELDS)
    fresh = World(params.simulator, simulation_seed(params), FIELDS, 4)
    events = fresh.events_frame(DAYS[4])
    _equal_frames(cached[0], events)
    _equal_frames(_snapshot(cached[1]).reset_index(), fresh.user_frame(DAYS[4]))
    # Asking for an earlier day after a later one rebuilds it (the cache never rewinds a world).
    _equal_frames(simulate_day(DAYS[1], params, FIELDS)[0], World(params.simulator, simulation_seed(params),
                                                                  FIELDS, 1).events_frame(DAYS[1]))
    with pytest.raises(ValueError, match="cannot rewind"):
        world_on(DAYS[4], params, FIELDS).advance_to(2)


# --- propensity ------------------------------------------------------------------------------------------------


def test_users_differ_in_base_click_rate_only_with_a_propensity():
    flat, world_flat = _params(), world_on(DAYS[3], _params(), FIELDS)
    assert not world_flat.click_propensity.any() and not world_flat.conversion_propensity.any()
    params = _params(click_propensity_sd=1.0)
    world = world_on(DAYS[3], params, FIELDS)
    assert world.click_propensity.std() == pytest.approx(1.0, rel=0.15)
    events = pd.concat([simulate_day(ds, params, FIELDS)[0] for ds in DAYS[2:4]])
    ctr = events.groupby("user_id")["click"].mean()
    high = world.click_propensity[ctr.index] > 0
    assert ctr[high].mean() > 1.3 * ctr[~high].mean()
    flat_events = simulate_day(DAYS[3], flat, FIELDS)[0]
    assert len(flat_events) == len(simulate_day(DAYS[3], params, FIELDS)[0])  # same impressions, other clicks


# --- sticky features --------------------------------------------------------------------------------------------


def test_sticky_features_overlap_from_day_to_day_and_memoryless_ones_do_not():
    memoryless, sticky = _overlap(_params()), _overlap(_sticky())
    for name in ("clicked_ad_categories", "pages"):
        assert memoryless[name] < 0.3 and sticky[name] > 0.5, (name, memoryless[name], sticky[name])
    for name in ("score_a", "score_b"):
        assert sticky[name] > memoryless[name] and sticky[name] > 0.95, (name, memoryless[name], sticky[name])


def test_the_overlap_measure_is_one_for_a_world_that_does_not_change_and_counts_sets():
    frozen = _params(interest_drift=0.0, id_meaning_shift=0.0, list_turnover=0.0, dense_ema_weight=1e-9)
    overlap = day_to_day_overlap(DAYS[:3], frozen, FIELDS)
    assert overlap["pages"] == overlap["clicked_ad_categories"] == 1.0
    assert overlap["score_a"] > 0.999999
    # With intra-day rows the measure reads each day's 00:00 snapshot only.
    assert day_to_day_overlap(DAYS[:3], _sticky(intraday_updates=True), FIELDS) == day_to_day_overlap(
        DAYS[:3], _sticky(), FIELDS)


def test_sticky_lists_keep_each_users_length_and_replace_about_the_turnover():
    params = _sticky(list_turnover=0.25)
    a, b = (_snapshot(simulate_day(ds, params, FIELDS)[1]) for ds in DAYS[2:4])
    common = a.index.intersection(b.index)
    la, lb = a.loc[common, "pages"].map(len), b.loc[common, "pages"].map(len)
    assert (la == lb).all()
    kept = sum(np.sum(x == y) for x, y in zip(a.loc[common, "pages"], b.loc[common, "pages"]))
    # A replaced id may be redrawn as itself: the kept share is at least 1 - turnover.
    assert 0.72 < kept / la.sum() < 0.85


# --- intra-day updates ------------------------------------------------------------------------------------------


def test_without_intraday_updates_the_users_partition_is_one_snapshot_a_day():
    _, users = simulate_day(DAYS[2], _sticky(), FIELDS)
    assert users["user_id"].is_unique and (users["event_ts"] == pd.Timestamp(DAYS[2], tz="UTC")).all()


def test_each_click_appends_its_ads_id_to_the_engagement_list_after_the_pipelines_delay():
    params = _sticky(intraday_updates=True)
    events, users = simulate_day(DAYS[3], params, FIELDS)
    world = world_on(DAYS[3], params, FIELDS)
    start, delay = pd.Timestamp(DAYS[3], tz="UTC"), pd.Timedelta(seconds=params.simulator.intraday_delay_seconds)
    snapshot = users[users["event_ts"] == start].set_index("user_id")
    updates = users[users["event_ts"] > start]
    assert snapshot.index.is_unique and users["event_ts"].is_monotonic_increasing
    clicks = events[events["click"] == 1].sort_values(["event_ts", "impression_id"], kind="stable")
    clicks = clicks[clicks["event_ts"] + delay < start + pd.Timedelta(days=1)]
    assert len(updates) == len(clicks)
    engaged = world.engagement_ids()
    cap = int(4 * 4) + 1
    for uid, rows in list(updates.groupby("user_id"))[:50]:
        mine = clicks[clicks["user_id"] == uid]
        assert (rows["event_ts"].to_numpy() == (mine["event_ts"] + delay).to_numpy()).all()
        expected = list(snapshot.at[uid, "clicked_ad_categories"]) + list(engaged[mine["ad_id"].to_numpy()])
        for i, held in enumerate(rows["clicked_ad_categories"]):
            assert list(held) == expected[: len(snapshot.at[uid, "clicked_ad_categories"]) + i + 1][-cap:]
        # Only the engagement list changes within the day.
        for col in ("score_a", "score_b", "pages"):
            assert all(np.array_equal(v, snapshot.at[uid, col]) for v in rows[col])


def test_impressions_join_the_latest_users_row_at_or_before_them():
    params = _sticky(intraday_updates=True)
    events, users = simulate_day(DAYS[3], params, FIELDS)
    frame = joined_day(events, users, params)
    assert len(frame) == len(events) and frame["event_ts"].is_monotonic_increasing
    start = pd.Timestamp(DAYS[3], tz="UTC")
    updates = users[users["event_ts"] > start]
    uid = updates["user_id"].value_counts().index[0]  # a user with several updates
    theirs = frame[frame["user_id"] == uid]
    rows = users[users["user_id"] == uid].sort_values("event_ts")
    for _, imp in theirs.iterrows():
        latest = rows[rows["event_ts"] <= imp["event_ts"]].iloc[-1]
        assert np.array_equal(imp["clicked_ad_categories"], latest["clicked_ad_categories"])
    # At least one of the user's impressions saw an updated list, at least one the morning's.
    seen = {len(v) for v in theirs["clicked_ad_categories"]}
    assert len(seen) > 1


def test_intraday_updates_need_an_id_list_of_the_view():
    with pytest.raises(ValueError, match="intraday_list 'score_a' is not an id-list"):
        simulate_day(DAYS[0], _params(intraday_updates=True, intraday_list="score_a"), FIELDS)


def test_the_study_profile_turns_the_world_on_and_the_daily_loop_keeps_the_calibrated_one():
    base, study = load_params().simulator, STUDY
    assert (base.click_propensity_sd, base.dense_ema_weight, base.list_turnover, base.intraday_updates) == (
        0.0, 1.0, 1.0, False)
    assert study.click_propensity_sd > 0 and study.dense_ema_weight < 1 and study.list_turnover < 1
    assert study.intraday_updates
