"""The study's days: which dates, which world, and each impression joined with the user row in force at its time.

A day's users partition may hold several timestamped rows per user (features that change within the day, e.g.
recent-engagement id lists): each impression gets the latest row at or before it (a point-in-time join, what
Feast's historical retrieval does: :func:`sum_platform.sources.joined_day`), and the study embeds each distinct
(user, row) once. With one row per user stamped at the day's start that is the daily snapshot join.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd

from sum_platform.config import Params
from sum_platform.sources import day_frames, joined_day, source_dates

#: How far past ``days`` the simulator's calendar is searched for usable days (each is simulated once).
_SIMULATED_SEARCH = 10
#: The column carrying each user row's index through the join.
_ROW = "_study_row"


@dataclass
class Day:
    """One day of the source.

    Attributes:
        ds: The date.
        frame: Impressions in time order with the user features in force at each (point in time).
        users: Every user row of the day (``user_id``, features; several per user when features change within
            the day), sorted by user then row time.
        rows: int ``[n_impressions]``: the row of ``users`` each impression was joined with (-1: none).
    """

    ds: str
    frame: pd.DataFrame
    users: pd.DataFrame
    rows: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        if self.rows is None:  # one row per user: the impression's user is its row
            self.rows = pd.Index(self.users["user_id"].to_numpy()).get_indexer(self.frame["user_id"].to_numpy())

    @property
    def latest(self) -> np.ndarray:
        """Row index of each user's last row of the day (what the daily batch after the day embeds)."""
        uid = self.users["user_id"].to_numpy()
        if not len(uid):
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.r_[uid[1:] != uid[:-1], True])


def world_params(params: Params, index: int) -> tuple[Params, dict]:
    """The params a seed's data is drawn with, and a description of that world.

    Seed ``index`` of the study draws its own simulated world: the simulator's seed (``simulator.seed``; null:
    the platform seed) offset by ``index``. Other sources
    hold fixed data: every seed sees the same days.
    """
    if params.source.kind != "simulator":
        return params, {"source": params.source.kind, "world": "fixed data (the same days for every seed)"}
    sim = params.simulator
    world = int(params.seed if sim.seed is None else sim.seed) + index  # null: the platform seed
    return params.model_copy(update={"simulator": sim.model_copy(update={"seed": world})}), \
        {"source": "simulator", "world": f"simulator.seed = {world}", "world_seed": world}


def _candidate_dates(params: Params, days: int) -> Iterator[str]:
    listed = source_dates(params)
    if listed is not None:
        yield from listed
        return
    start = pd.Timestamp(params.simulator.start_date)
    for i in range(_SIMULATED_SEARCH * days):
        yield (start + pd.Timedelta(days=i)).date().isoformat()


def iter_days(params: Params, days: int) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """The source's usable days (at least ``validation.min_event_rows`` impressions) as ``(ds, events, users)``,
    each built once and only as many as are taken."""
    for ds in _candidate_dates(params, days):
        events, users = day_frames(ds, params)
        if len(events) >= params.validation.min_event_rows:
            yield ds, events, users


def study_days(params: Params, days: int) -> list[str]:
    """The source's first ``days`` usable dates (only those days are built)."""
    return [ds for ds, _, _ in _take(params, days)]


def load_days(params: Params, days: int) -> list[Day]:
    """The source's first ``days`` usable days, joined."""
    return [joined(ds, events, users, params) for ds, events, users in _take(params, days)]


def _take(params: Params, days: int) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    out = list(itertools.islice(iter_days(params, days), days))
    if len(out) < days:
        raise ValueError(f"the source has {len(out)} usable days, the study needs {days}")
    return out


def joined(ds: str, events: pd.DataFrame, users: pd.DataFrame, params: Params) -> Day:
    """A day's impressions each joined with its user's row in force at the impression's time (the platform's
    point-in-time join, :func:`sum_platform.sources.joined_day`), and which row that was."""
    uid, ts = params.events.user_id, params.events.timestamp
    order = [uid, ts] if ts in users.columns else [uid]
    users = users.sort_values(order, kind="stable").reset_index(drop=True)
    frame = joined_day(events, users.assign(**{_ROW: np.arange(len(users), dtype=np.int64)}), params)
    rows = frame.pop(_ROW).to_numpy(np.int64)
    return Day(ds, frame, users, rows)
