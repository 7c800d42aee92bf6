"""The study's serving replay: in memory through the row owner's pooling rule (sum_pipeline/study_replay.py), equal
bit for bit to the replay through a real Feast store (sum_pipeline/study_store_replay.py: serving's write path and a
point-in-time read-back), on a constructed case whose answers are known (embeddings constant per snapshot) and on
a random one (tens of users, hundreds of requests, a user whose features change within a day)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sum_pipeline.study_data import Day, joined
from sum_pipeline.study_replay import replay
from sum_pipeline.study_store_replay import replay_store, store_supports_unit
from sum_pipeline.study_upstream import Upstream
from sum_platform.config import load_params
from sum_platform.workspace import snapshot_id_for

#: The pool units the store can replay (serving's write path gains the snapshot unit in parallel).
STORE_UNITS = ("write", "snapshot") if store_supports_unit() else ("write",)


def _params(rate: float = 0.0, batch: int = 1):
    params = load_params()
    return params.model_copy(update={"study": params.study.model_copy(update={"replay_batch": batch,
                                                                               "realtime_fallback_rate": rate})})


def _day(ds: str, times: list[str], users: list[int]) -> Day:
    frame = pd.DataFrame({"impression_id": [f"{ds}-{i}" for i in range(len(users))], "user_id": users,
                          "event_ts": pd.to_datetime([f"{ds} {t}" for t in times], utc=True)})
    return Day(ds, frame, pd.DataFrame({"user_id": [1, 2]}))


def _const(value: float, n: int, k: int, d: int) -> np.ndarray:
    return np.full((n, k, d), value, dtype=np.float16)


@pytest.fixture(scope="module")
def constructed():
    params = load_params()
    k, d = params.model.num_embeddings, params.model.embedding_dim
    days = [_day("2026-03-01", ["10:00"], [1]),
            _day("2026-03-02", ["10:00", "11:00", "12:00"], [1, 1, 2]),
            _day("2026-03-03", ["09:00"], [1])]
    ids = [snapshot_id_for(day.ds) for day in days[:2]]
    # S_0 = 1 on day 0's users, S_1 = 2 on day 1's; S_0 recomputes 10 on day 1, S_1 recomputes 20 on day 2.
    up = Upstream(batch=[_const(1, 2, k, d), _const(2, 2, k, d)], fresh=[_const(10, 2, k, d), _const(20, 2, k, d)],
                  batch_ids=ids, fresh_ids=ids)
    return days, up


def _firsts(served: dict, source: str = "served") -> list[list[float]]:
    return [[float(row[0, 0]) for row in day] for day in served[source]]


def test_offline_serves_the_pooled_daily_batch_and_raw_reads_the_latest_under_either_unit(constructed):
    days, up = constructed
    for unit in ("snapshot", "write"):
        served, stats = replay("offline", _params(), days, up, seed=0, unit=unit)
        assert _firsts(served) == [[1.0, 1.0, 1.0], [1.5]]       # day 2: AP of the batches 1 and 2
        assert _firsts(served, "raw") == [[1.0, 1.0, 1.0], [2.0]]
        assert stats["coverage"] == 1.0 and stats["fallback_rate"] is None


def test_async_serves_the_previous_requests_write_back(constructed):
    days, up = constructed
    served, _ = replay("async", _params(), days, up, seed=0, unit="write")
    # write pooling: user 1's batch 1, then AP(10, 1) = 5.5 after its first request's write-back; user 2: 1.
    # Day 2: the day-1 batch (2) joins user 1's pool of two write-backs: AP(2, 10, 10).
    assert _firsts(served) == [[1.0, 5.5, 1.0], [pytest.approx((2 + 10 + 10) / 3, abs=0.01)]]
    served, _ = replay("async", _params(), days, up, seed=0, unit="snapshot")
    # snapshot pooling: S_0's write-back replaces S_0's batch version (10); day 2: AP(S_1's batch 2, S_0's 10)
    assert _firsts(served) == [[1.0, 10.0, 1.0], [6.0]]


def test_realtime_serves_its_own_fresh_compute_and_the_cache_on_fallback(constructed):
    days, up = constructed
    fresh, stats = replay("realtime", _params(rate=0.0), days, up, seed=0, unit="write")
    assert _firsts(fresh)[0] == [5.5, 7.0, 5.5]                # AP(10, 1), AP(10, 10, 1), AP(10, 1)
    assert stats["fallback_rate"] == 0.0
    cached, stats = replay("realtime", _params(rate=1.0), days, up, seed=0, unit="write")
    assert _firsts(cached)[0] == [1.0, 5.5, 1.0]               # what async serves: the value before the compute
    assert stats["fallback_rate"] == 1.0
    fresh, _ = replay("realtime", _params(rate=0.0), days, up, seed=0, unit="snapshot")
    assert _firsts(fresh)[0] == [10.0, 10.0, 10.0]             # S_0's fresh value replaces its batch version


def test_a_stale_offline_batch_reads_the_batch_of_day_t_minus_s(constructed):
    days, up = constructed
    served, stats = replay("offline", _params(), days, up, seed=0, staleness=2)
    got = _firsts(served)
    assert np.isnan(got[0]).all() and got[1] == [1.0]         # day 1 reads day -1's batch (none); day 2 day 0's
    assert stats["coverage"] == pytest.approx(1 / 4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline", "async", "realtime"])
def test_the_in_memory_replay_equals_the_store_replay_bit_for_bit(mode, random_case, tmp_path):
    params, days, up = random_case
    for unit in STORE_UNITS:
        memory, mstats = replay(mode, params, days, up, seed=3, unit=unit)
        store, sstats = replay_store(mode, params, days, up, seed=3, workspace=tmp_path / f"{mode}-{unit}", unit=unit)
        assert memory.keys() == store.keys()
        for source in memory:
            for t, (a16, b) in enumerate(zip(memory[source], store[source], strict=True)):
                # in memory the served fp16 values as stored, from the store as float32: the cast is exact
                assert a16.dtype == np.float16 and b.dtype == np.float32 and a16.shape == b.shape
                a = a16.astype(np.float32)
                # bit for bit: the same fp16 values, NaN (nothing served) on the same rows
                assert np.array_equal(a.view(np.uint32), b.view(np.uint32)) or np.array_equal(a, b, equal_nan=True), \
                    (mode, unit, source, t, np.argwhere(~((a == b) | (np.isnan(a) & np.isnan(b))))[:3])
        assert mstats == sstats
        served = np.concatenate(memory["served"])
        assert np.isfinite(served[:, 0, 0]).mean() > 0.5        # the case serves something to compare


@pytest.fixture(scope="module")
def random_case():
    """Four days of 20-30 active users among 40, ~150 requests a day at distinct milliseconds, random fp16
    embeddings per snapshot, and on day 2 a second, later feature row for some users (point in time)."""
    params = _params(rate=0.3, batch=16)
    k, d = params.model.num_embeddings, params.model.embedding_dim
    rng = np.random.default_rng(0)
    days = []
    for i, ds in enumerate(["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]):
        known = np.sort(rng.choice(40, size=30 + i, replace=False))
        users = pd.DataFrame({"user_id": known, "event_ts": pd.Timestamp(ds, tz="UTC")})
        if i == 2:  # some users' features change at noon: a second row
            later = users.iloc[::3].assign(event_ts=pd.Timestamp(f"{ds} 12:00", tz="UTC"))
            users = pd.concat([users, later], ignore_index=True)
        n = 150
        ms = np.sort(rng.choice(86_400_000 // 7, size=n, replace=False)) * 7   # distinct, >= 7 ms apart
        events = pd.DataFrame({"impression_id": [f"{ds}-{j:04d}" for j in range(n)],
                               "user_id": rng.choice(known, size=n),
                               "event_ts": pd.Timestamp(ds, tz="UTC") + pd.to_timedelta(ms, unit="ms")})
        days.append(joined(ds, events, users, params))
    assert len(days[2].users) > days[2].users["user_id"].nunique()
    ids = [snapshot_id_for(day.ds) for day in days]
    emb = lambda n: rng.normal(size=(n, k, d)).astype(np.float16)  # noqa: E731
    up = Upstream(batch=[emb(len(day.latest)) for day in days[:-1]], fresh=[emb(len(day.users)) for day in days[1:]],
                  batch_ids=ids[:-1], fresh_ids=ids[:-1])
    return params, days, up


def test_each_impression_is_joined_with_the_latest_user_row_at_or_before_it(random_case):
    params, days, _ = random_case
    day = days[2]
    row_ts = pd.to_datetime(day.users["event_ts"], utc=True).to_numpy()[day.rows]
    assert (day.users["user_id"].to_numpy()[day.rows] == day.frame["user_id"].to_numpy()).all()
    assert (row_ts <= day.frame["event_ts"].to_numpy()).all()
    later = day.frame["event_ts"].dt.hour >= 12
    changed = day.frame["user_id"].isin(day.users["user_id"][day.users["event_ts"].dt.hour == 12])
    assert (pd.to_datetime(row_ts[later & changed]).hour == 12).all() and (later & changed).any()
    assert (pd.to_datetime(row_ts[~later]).hour == 0).all()
    one = days[1]   # one row per user: the row is the user's
    assert (one.users["user_id"].to_numpy()[one.rows] == one.frame["user_id"].to_numpy()).all()
    assert "_study_row" not in one.frame.columns and len(one.latest) == len(one.users)
