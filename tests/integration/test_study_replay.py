"""The study's serving replay (sum_pipeline/study.py) through a real Feast store: what each impression is
served in each mode, on a constructed case whose answers are known (embeddings constant per snapshot)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sum_pipeline.study import Day, Upstream, replay_mode
from sum_platform.config import load_params


def _day(ds: str, times: list[str], users: list[int]) -> Day:
    frame = pd.DataFrame({"impression_id": [f"{ds}-{i}" for i in range(len(users))], "user_id": users,
                          "event_ts": pd.to_datetime([f"{ds} {t}" for t in times], utc=True)})
    return Day(ds, frame, pd.DataFrame({"user_id": [1, 2]}))


def _const(value: float, n: int, k: int, d: int) -> np.ndarray:
    return np.full((n, k, d), value, dtype=np.float16)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    params = load_params()
    k, d = params.model.num_embeddings, params.model.embedding_dim
    days = [_day("2026-03-01", ["10:00"], [1]),
            _day("2026-03-02", ["10:00", "11:00", "12:00"], [1, 1, 2]),
            _day("2026-03-03", ["09:00"], [1])]
    # S_0 = 1 on day 0's users, S_1 = 2 on day 1's; S_0 recomputes 10 on day 1, S_1 recomputes 20 on day 2.
    up = Upstream(batch=[_const(1, 2, k, d), _const(2, 2, k, d)], fresh=[_const(10, 2, k, d), _const(20, 2, k, d)])
    return params, days, up, tmp_path_factory.mktemp("study-replay")


def _served(params, days, up, mode, work, rate=0.0, source="served"):
    p = params.model_copy(update={"study": params.study.model_copy(update={"replay_batch": 1, "realtime_fallback_rate": rate})})
    served, stats = replay_mode(mode, p, days, up, seed=0, workspace=work / f"{mode}-{rate}", progress=lambda *a: None)
    return [[float(row[0, 0]) for row in day] for day in served[source]], served, stats


@pytest.mark.slow
def test_offline_serves_the_pooled_daily_batch_and_raw_reads_the_latest(case):
    params, days, up, work = case
    got, served, stats = _served(params, days, up, "offline", work)
    assert got == [[1.0, 1.0, 1.0], [1.5]]            # day 2: AP of the batches 1 and 2
    assert [[float(r[0, 0]) for r in day] for day in served["raw"]] == [[1.0, 1.0, 1.0], [2.0]]
    assert stats["coverage"] == 1.0 and stats["fallback_rate"] is None


@pytest.mark.slow
def test_async_serves_the_previous_requests_write_back(case):
    params, days, up, work = case
    got, _, _ = _served(params, days, up, "async", work)
    # user 1: batch 1 -> after its first request's recompute AP(10, 1) = 5.5; user 2 never requested before: 1.
    # Day 2: the day-1 batch (2) joins user 1's pool of two write-backs: AP(2, 10, 10).
    assert got[0] == [1.0, 5.5, 1.0]
    assert got[1] == [pytest.approx((2 + 10 + 10) / 3, abs=0.01)]


@pytest.mark.slow
def test_realtime_serves_its_own_fresh_compute_and_the_cache_on_fallback(case):
    params, days, up, work = case
    fresh, _, stats = _served(params, days, up, "realtime", work, rate=0.0)
    assert fresh[0] == [5.5, 7.0, 5.5]                 # AP(10, 1), AP(10, 10, 1), AP(10, 1)
    assert stats["fallback_rate"] == 0.0
    cached, _, stats = _served(params, days, up, "realtime", work, rate=1.0)
    assert cached[0] == [1.0, 5.5, 1.0]                # what async serves: the value before the compute
    assert stats["fallback_rate"] == 1.0
