"""MovieLens-100K as daily partitions of the data contract: one day per calendar day (UTC) of the ratings.

A rating is an impression of the movie (the ad side) to the user on the day it was given:

    events of ds:  every rating with date(event_ts) == ds; ad_id = the item, ad_category = its first genre,
                   ad dense = the item's mean rating and rating count *before* ds; click = rating >= 4,
                   conversion = rating == 5 (a conversion is always a click)
    users of ds:   every user who rated anything up to ds, event_ts = ds 00:00 UTC, features from the
                   ratings strictly before ds only (a day's own ratings are its labels, never its inputs):
                   dense counts and averages, and sparse id lists of the recently rated / liked items and
                   their genres, plus the profile's occupation and gender as one-id lists

Everything is a pure function of the dataset and ``ds``, so a rerun of a date writes the same partitions.
"""

from __future__ import annotations

from datetime import date, datetime, timezone

import numpy as np
import pandas as pd

from sum_platform.movielens import MovieLens

__all__ = ["RECENT", "USER_DENSE", "USER_SPARSE", "AD_DENSE", "calendar", "vocabularies", "day_partitions"]

#: How many of a user's latest ratings the recent-history lists hold.
RECENT = 20
USER_DENSE = ("ml_age", "ml_ratings_before", "ml_mean_rating_before", "ml_days_since_first")
USER_SPARSE = ("ml_recent_items", "ml_recent_genres", "ml_liked_items", "ml_occupation", "ml_gender")
AD_DENSE = ("ml_item_mean_rating", "ml_item_ratings_before")


def calendar(ml: MovieLens) -> list[str]:
    """The dates (``YYYY-MM-DD``, UTC) that hold at least one rating, in order."""
    return sorted({d.isoformat() for d in ml.ratings["event_ts"].dt.date.unique()})


def vocabularies(ml: MovieLens) -> dict[str, dict]:
    """Id maps of the categorical values (sorted, so stable): ``genre``, ``occupation``, ``gender``."""
    genres = sorted({g for gs in ml.items["genres"] for g in gs})
    return {
        "genre": {g: i for i, g in enumerate(genres)},
        "occupation": {o: i for i, o in enumerate(sorted(ml.users["occupation"].unique()))},
        "gender": {g: i for i, g in enumerate(sorted(ml.users["gender"].unique()))},
    }


def _midnight(ds: str) -> pd.Timestamp:
    return pd.Timestamp(datetime.combine(date.fromisoformat(ds), datetime.min.time(), tzinfo=timezone.utc))


def day_partitions(ml: MovieLens, ds: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The events and users partitions of ``ds``.

    Returns:
        ``(events, users)``: events with ``impression_id``, ``user_id``, ``event_ts``, ``ad_id``,
        ``ad_category``, :data:`AD_DENSE`, ``click``, ``conversion``; users with ``user_id``, ``event_ts``,
        :data:`USER_DENSE` (float32) and :data:`USER_SPARSE` (lists of int64).
    """
    vocab = vocabularies(ml)
    start, end = _midnight(ds), _midnight(ds) + pd.Timedelta(days=1)
    ratings = ml.ratings.sort_values(["event_ts", "user_id", "item_id"], kind="stable")
    before = ratings[ratings["event_ts"] < start]
    today = ratings[(ratings["event_ts"] >= start) & (ratings["event_ts"] < end)]
    genre_ids = ml.items.set_index("item_id")["genres"].map(lambda gs: [vocab["genre"][g] for g in gs])
    first_genre = genre_ids.map(lambda ids: ids[0] if ids else 0)

    item_stats = before.groupby("item_id")["rating"].agg(["mean", "count"])
    events = pd.DataFrame({
        "impression_id": [f"ml-{u}-{i}" for u, i in zip(today["user_id"], today["item_id"])],
        "user_id": today["user_id"].to_numpy(np.int64),
        "event_ts": today["event_ts"].to_numpy(),
        "ad_id": today["item_id"].to_numpy(np.int64),
        "ad_category": today["item_id"].map(first_genre).to_numpy(np.int64),
        "ml_item_mean_rating": today["item_id"].map(item_stats["mean"]).fillna(0.0).to_numpy(np.float32),
        "ml_item_ratings_before": today["item_id"].map(item_stats["count"]).fillna(0).to_numpy(np.float32),
        "click": (today["rating"] >= 4).to_numpy(np.int8),
        "conversion": (today["rating"] == 5).to_numpy(np.int8),
    })
    events["event_ts"] = events["event_ts"].astype("datetime64[us, UTC]")

    seen = ratings[ratings["event_ts"] < end]["user_id"].unique()
    profile = ml.users.set_index("user_id").loc[np.sort(seen)]
    history = before.groupby("user_id")
    stats = history["rating"].agg(["mean", "count"]).reindex(profile.index)
    first = history["event_ts"].min().reindex(profile.index)
    latest = before.iloc[::-1]  # most recent first
    recent = latest.groupby("user_id").head(RECENT).groupby("user_id")["item_id"].agg(list)
    liked = latest[latest["rating"] >= 4].groupby("user_id").head(RECENT).groupby("user_id")["item_id"].agg(list)

    def ids(series: pd.Series) -> list[np.ndarray]:
        return [np.asarray(v if isinstance(v, list) else [], dtype=np.int64) for v in series.reindex(profile.index)]

    recent_items = ids(recent)
    genre_of = genre_ids.to_dict()  # item -> genre ids: a dict lookup per recent item, not a Series index
    users = pd.DataFrame({
        "user_id": profile.index.to_numpy(np.int64),
        "event_ts": pd.Series([start] * len(profile), dtype="datetime64[us, UTC]"),
        "ml_age": profile["age"].to_numpy(np.float32),
        "ml_ratings_before": stats["count"].fillna(0).to_numpy(np.float32),
        "ml_mean_rating_before": stats["mean"].fillna(0.0).to_numpy(np.float32),
        "ml_days_since_first": ((start - first).dt.total_seconds() / 86_400).fillna(0.0).to_numpy(np.float32),
        "ml_recent_items": recent_items,
        "ml_recent_genres": [np.unique(np.concatenate([genre_of[i] for i in items] or [[]])).astype(np.int64)
                             for items in recent_items],
        "ml_liked_items": ids(liked),
        "ml_occupation": [np.asarray([vocab["occupation"][o]], dtype=np.int64) for o in profile["occupation"]],
        "ml_gender": [np.asarray([vocab["gender"][g]], dtype=np.int64) for g in profile["gender"]],
    })
    return events, users
