"""MovieLens-100K read from the recbole 1.2.1 wheel (sum_platform/movielens.py): pinned, verified, parsed.

Fetches the wheel from the package registry once per session (about 2 MB, ~1 s), as a fresh machine does.
"""

from __future__ import annotations

import pandas as pd
import pytest

from sum_platform.movielens import WHEEL_NAME, MovieLensError, fetch_wheel, read_movielens


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
