"""MovieLens-100K read from the recbole 1.2.1 wheel (sum_platform/movielens.py): pinned, verified, parsed;
and its daily partitions of the data contract (sum_platform/movielens_days.py), point-in-time correct.

Fetches the wheel from the package registry once per session (about 2 MB, ~1 s), as a fresh machine does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sum_platform.movielens import WHEEL_NAME, MovieLens, MovieLensError, fetch_wheel, read_movielens
from sum_platform.movielens_days import USER_DENSE, USER_SPARSE, calendar, day_partitions, vocabularies


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    return fetch_wheel(tmp_path_factory.mktemp("movielens-cache"))


def test_the_tables_hold_what_the_files_hold(wheel):
    ml = read_movielens(wheel)
    assert len(ml.ratings) == 100_000 and len(ml.users) == 943 and len(ml.items) == 1682
    assert set(ml.ratings["rating"].unique()) == {1, 2, 3, 4, 5}
    assert ml.ratings["user_id"].isin(ml.users["user_id"]).all()
    assert ml.ratings["item_id"].isin(ml.items["item_id"]).all()
    assert str(ml.ratings["event_ts"].dtype) == "datetime64[us, UTC]"
    days = ml.ratings["event_ts"].dt.date
    assert (days.min().isoformat(), days.max().isoformat(), days.nunique()) == ("1997-09-20", "1998-04-22", 213)
    toy_story = ml.items.set_index("item_id").loc[1]
    assert toy_story["title"] == "Toy Story" and toy_story["genres"] == ["Animation", "Children's", "Comedy"]
    assert ml.users.set_index("user_id").loc[2, ["age", "gender"]].tolist() == [53, "F"]


def test_a_cached_wheel_is_used_and_a_substituted_one_is_refused_and_deleted(wheel, tmp_path):
    before = wheel.stat().st_mtime_ns
    assert fetch_wheel(wheel.parent) == wheel and wheel.stat().st_mtime_ns == before  # cached: not fetched again
    fake = tmp_path / WHEEL_NAME
    fake.write_bytes(b"not the pinned wheel")
    with pytest.raises(MovieLensError, match="sha256"):
        fetch_wheel(tmp_path)
    assert not fake.exists()


def test_reading_twice_gives_the_same_tables(wheel):
    a, b = read_movielens(wheel), read_movielens(wheel)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.items, b.items)


# ---------------------------------------------------------------------------------------------
# Daily partitions of the data contract (sum_platform/movielens_days.py)
# ---------------------------------------------------------------------------------------------
def _tiny() -> MovieLens:
    """Two users, three items; user 1 rates on two days, user 2 only on the second."""
    ts = lambda s: pd.Timestamp(s, tz="UTC")  # noqa: E731
    ratings = pd.DataFrame({
        "user_id": [1, 1, 2, 1],
        "item_id": [10, 20, 10, 30],
        "rating": pd.array([5, 2, 4, 3], dtype="int8"),
        "event_ts": pd.Series([ts("1998-01-01 10:00"), ts("1998-01-01 11:00"), ts("1998-01-02 09:00"),
                               ts("1998-01-02 23:59:59")]).astype("datetime64[us, UTC]"),
    })
    users = pd.DataFrame({"user_id": [1, 2], "age": [30, 40], "gender": ["F", "M"],
                          "occupation": ["writer", "artist"], "zip_code": ["1", "2"]})
    items = pd.DataFrame({"item_id": [10, 20, 30], "title": ["a", "b", "c"], "release_year": [1990.0, 1991.0, None],
                          "genres": [["Drama"], ["Comedy", "Drama"], []]})
    return MovieLens(ratings=ratings, users=users, items=items)


def test_a_days_inputs_come_only_from_the_ratings_before_it():
    ml = _tiny()
    assert calendar(ml) == ["1998-01-01", "1998-01-02"]
    events, users = day_partitions(ml, "1998-01-02")
    # Today's ratings are today's labels: user 2's rating of item 10 and user 1's of item 30.
    assert events[["user_id", "ad_id", "click", "conversion"]].values.tolist() == [[2, 10, 1, 0], [1, 30, 0, 0]]
    assert events["ml_item_mean_rating"].tolist() == [5.0, 0.0]  # item 10 as rated before today; 30 never
    u = users.set_index("user_id")
    assert u.loc[1, "ml_ratings_before"] == 2 and u.loc[1, "ml_mean_rating_before"] == 3.5
    assert u.loc[1, "ml_recent_items"].tolist() == [20, 10]  # most recent first; item 30 is today's
    assert u.loc[1, "ml_liked_items"].tolist() == [10]
    assert u.loc[1, "ml_days_since_first"] == pytest.approx(14 / 24)
    assert u.loc[2, "ml_ratings_before"] == 0 and len(u.loc[2, "ml_recent_items"]) == 0  # new today: no history
    vocab = vocabularies(ml)
    assert u.loc[1, "ml_recent_genres"].tolist() == sorted({vocab["genre"]["Drama"], vocab["genre"]["Comedy"]})
    assert u.loc[1, "ml_occupation"].tolist() == [vocab["occupation"]["writer"]]
    first_events, first_users = day_partitions(ml, "1998-01-01")
    assert first_users["user_id"].tolist() == [1] and first_users["ml_ratings_before"].tolist() == [0.0]
    assert len(first_events) == 2


def test_every_rating_is_an_impression_of_its_day_with_the_contracts_types(wheel):
    ml = read_movielens(wheel)
    days = calendar(ml)
    assert len(days) == 213
    per_day = ml.ratings["event_ts"].dt.date.astype(str).value_counts()
    for ds in (days[0], days[100], days[-1]):
        events, users = day_partitions(ml, ds)
        assert len(events) == per_day[ds] and events["impression_id"].is_unique
        assert events["user_id"].isin(users["user_id"]).all()  # the referential check holds
        assert str(events["event_ts"].dtype) == str(users["event_ts"].dtype) == "datetime64[us, UTC]"
        assert (events["event_ts"].dt.date.astype(str) == ds).all()
        assert ((events["conversion"] == 0) | (events["click"] == 1)).all()
        for name in USER_DENSE:
            assert users[name].dtype == np.float32 and np.isfinite(users[name]).all()
        for name in USER_SPARSE:
            assert all(v.dtype == np.int64 for v in users[name])
    again = day_partitions(ml, days[100])
    pd.testing.assert_frame_equal(again[0], day_partitions(ml, days[100])[0])  # a pure function of (data, ds)
