"""The data-source layer: the parquet source maps a user's own files to the data contract by column names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sum_platform.config import load_params
from sum_platform.feature_store import spec_from_fields, user_feature_fields
from sum_platform.sources import SourceError, day_frames, first_date, joined_day, source_dates
from validation.suites import required_columns

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path, parquet: dict):
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["source"] = {**raw["source"], "kind": "parquet", "parquet": {
        "events": None, "users": None, "events_columns": {}, "users_columns": {}, **parquet}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


def _own_files(tmp_path: Path, spec) -> tuple[str, str]:
    """Two days of impressions and user snapshots under the user's own column names, naive timestamps."""
    rng = np.random.default_rng(0)
    shown = pd.to_datetime(["2026-03-01 23:59:00", "2026-03-01 08:00:00", "2026-03-02 00:00:00", "2026-03-02 10:30:00"])
    events = pd.DataFrame({
        "uid": [2, 1, 1, 3], "shown_at": shown, "ad_id": [5, 6, 7, 8], "ad_category": [1, 2, 3, 4],
        "ad_quality": [0.1, 0.2, 0.3, 0.4], "ad_price": [1.0, 2.0, 3.0, 4.0],
        "clicked": [1, 0, 1, 0], "conversion": [1, 0, 0, 0], "unrelated": ["x"] * 4})
    users = pd.DataFrame({"uid": [1, 2, 1, 1, 3], "snap": pd.to_datetime(
        ["2026-03-01 01:00", "2026-03-01 02:00", "2026-03-01 05:00", "2026-03-02 01:00", "2026-03-02 01:00"])})
    for name in spec.user_dense:
        users[name] = rng.random(len(users))  # float64: the source casts to the contract's float32
    for name in spec.user_sparse:
        users[name] = [list(rng.integers(0, 5, size=2)) for _ in range(len(users))]
    users.loc[2, spec.user_dense[0]] = 42.0  # user 1's later row of 03-01: its snapshot of the day
    (tmp_path / "ev").mkdir()
    (tmp_path / "us").mkdir()
    events.iloc[:2].to_parquet(tmp_path / "ev" / "a.parquet")
    events.iloc[2:].to_parquet(tmp_path / "ev" / "b.parquet")
    users.to_parquet(tmp_path / "us" / "all.parquet")
    return str(tmp_path / "ev" / "*.parquet"), str(tmp_path / "us" / "*.parquet")


def test_parquet_files_map_to_the_contract_by_column_names(tmp_path):
    base = load_params(PROJECT_ROOT / "params.yaml")
    spec = spec_from_fields(user_feature_fields(base), base)
    ev, us = _own_files(tmp_path, spec)
    params = _params(tmp_path, {"events": ev, "users": us,
                                "events_columns": {"user_id": "uid", "event_ts": "shown_at", "click": "clicked"},
                                "users_columns": {"user_id": "uid", "event_ts": "snap"}})
    assert source_dates(params) == ["2026-03-01", "2026-03-02"]
    assert first_date(params) == "2026-03-01"
    events, users = day_frames("2026-03-01", params)
    assert set(required_columns("events", spec, params)) <= set(events.columns)
    assert set(required_columns("users", spec, params)) == set(users.columns)
    assert "unrelated" not in events.columns
    # A row belongs to its UTC date (23:59 on 03-01 yes, 00:00 on 03-02 no), in time order, with derived ids.
    assert events["user_id"].tolist() == [1, 2] and events["click"].tolist() == [0, 1]
    assert events["impression_id"].tolist() == ["2026-03-01-0", "2026-03-01-1"]
    assert str(events["event_ts"].dtype) == "datetime64[us, UTC]" and events["click"].dtype == np.int8
    # Users: the latest row of a user on the day, stamped at the day's start, float32 and int64 lists.
    assert users["user_id"].tolist() == [1, 2]
    assert users.loc[0, spec.user_dense[0]] == np.float32(42.0) and users[spec.user_dense[0]].dtype == np.float32
    assert (users["event_ts"] == pd.Timestamp("2026-03-01", tz="UTC")).all()
    assert all(v.dtype == np.int64 for v in users[next(iter(spec.user_sparse))])
    events2, users2 = day_frames("2026-03-02", params)
    assert events2["user_id"].tolist() == [1, 3] and users2["user_id"].tolist() == [1, 3]
    # A pure function of the files and the date.
    again, _ = day_frames("2026-03-01", params)
    pd.testing.assert_frame_equal(events, again)


def test_parquet_source_errors_name_the_setting_to_fix(tmp_path):
    with pytest.raises(SourceError, match=r"source.parquet.events is not set"):
        day_frames("2026-03-01", _params(tmp_path, {}))
    with pytest.raises(SourceError, match=r"no file matches"):
        day_frames("2026-03-01", _params(tmp_path, {"events": str(tmp_path / "none" / "*.parquet")}))
    (tmp_path / "ev").mkdir()
    pd.DataFrame({"uid": [1], "event_ts": pd.to_datetime(["2026-03-01"])}).to_parquet(tmp_path / "ev" / "a.parquet")
    with pytest.raises(SourceError, match=r"lack column\(s\) \['user_id'.*map them in source.parquet.events_columns"):
        day_frames("2026-03-01", _params(tmp_path, {"events": str(tmp_path / "ev" / "*.parquet")}))


def test_the_simulator_is_unbounded_and_starts_at_its_start_date():
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert source_dates(params) is None
    assert first_date(params) == params.simulator.start_date


def test_joined_day_orders_by_time_and_drops_users_without_features():
    params = load_params()
    events = pd.DataFrame({"impression_id": ["b", "a", "c"], "user_id": [1, 2, 3],
                           "event_ts": pd.to_datetime(["2026-01-01 10:00", "2026-01-01 09:00", "2026-01-01 08:00"], utc=True)})
    users = pd.DataFrame({"user_id": [1, 2], "event_ts": pd.to_datetime(["2026-01-01"] * 2, utc=True), "sessions_7d": [5.0, 7.0]})
    frame = joined_day(events, users, params)
    assert frame["impression_id"].tolist() == ["a", "b"]  # user 3 has no features that day
    assert frame["sessions_7d"].tolist() == [7.0, 5.0]
    assert list(frame.columns).count("event_ts") == 1 and frame["event_ts"].is_monotonic_increasing


def test_joined_day_is_a_point_in_time_join_over_the_users_time_series():
    """Intra-day rows (simulator.intraday_updates): an impression reads its user's latest row at or before it."""
    params = load_params()
    ts = lambda *t: pd.to_datetime(list(t), utc=True, format="ISO8601").astype("datetime64[us, UTC]")  # noqa: E731
    events = pd.DataFrame({"impression_id": ["m", "n", "e", "l", "x"], "user_id": [1, 1, 1, 1, 2],
                           "event_ts": ts("2026-01-01 08:00", "2026-01-01 10:00", "2026-01-01 12:00",
                                          "2026-01-01 23:00", "2026-01-01 09:00")})
    users = pd.DataFrame({"user_id": [1, 1, 1, 2], "sessions_7d": np.array([1.0, 2.0, 3.0, 9.0], np.float32),
                          "liked_pages": [np.array([1]), np.array([1, 5]), np.array([1, 5, 7]), np.array([4])],
                          "event_ts": ts("2026-01-01", "2026-01-01 12:00", "2026-01-01 22:00", "2026-01-01 09:30")})
    frame = joined_day(events, users, params).set_index("impression_id")
    assert frame.loc[["m", "n", "e", "l"], "sessions_7d"].tolist() == [1.0, 1.0, 2.0, 3.0]  # e: exact time counts
    assert [list(v) for v in frame["liked_pages"]] == [[1], [1], [1, 5], [1, 5, 7]]
    assert "x" not in frame.index  # user 2's only row came after the impression
    assert frame["sessions_7d"].dtype == np.float32
