"""The study's serving replay, in memory, through the row owner's pooling rule (:mod:`sum_platform.embedding_row`).

Per mode, one :class:`~sum_platform.embedding_row.Slots` row for every user of the replayed days, written in the
order serving writes them (the same order and write times as the store replay,
``sum_pipeline/study_store_replay.py``, which ``tests/integration/test_study_replay.py`` checks bit for bit):

- the daily batch: after day ``i``, the production snapshot on the day's users (latest rows), in every mode;
- *async*: each request batch of ``study.replay_batch`` impressions reads the served pool, then the fresh value of
  ``S_{t-1}`` on the features in force at each user's last request of the batch is written back;
- *realtime*: the batch's fresh values are written, then read; a ``study.realtime_fallback_rate`` share of the
  requests (an assumption, not a measurement) reads before the write (the cache);
- *offline*: the daily batch value written after day ``t - s`` (``s = study.offline_staleness_days``), pooled
  (``served``) or read raw (``raw``: the latest batch version alone, no AP).

Offline holds only daily batch writes, each of a new snapshot: it pools the same versions under either pool unit.
The online store keeps a row until it is rewritten (no TTL), as here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sum_platform.config import Params
from sum_platform.embedding_row import PoolUnit, Slots, pool, shift_in
from sum_pipeline.study_data import Day
from sum_pipeline.study_upstream import Upstream

ONLINE_MODES = ("async", "realtime")


def event_ms(ts: pd.Series) -> np.ndarray:
    return pd.to_datetime(ts, utc=True).dt.as_unit("ms").astype("int64").to_numpy()


def end_of_day_ms(ds: str) -> int:
    return int((pd.Timestamp(ds, tz="UTC") + pd.Timedelta(days=1)).value // 1_000_000) - 1


def fallbacks(seed: int, t: int, n: int, rate: float) -> np.ndarray:
    """Which of window day ``t``'s ``n`` requests miss realtime's latency budget (seeded per seed and day)."""
    return np.random.default_rng([seed, t]).random(n) < rate


def last_of_each(ids: np.ndarray) -> np.ndarray:
    """Positions of each id's last occurrence, in order of those positions (a repeated user keeps its last row)."""
    rev = ids[::-1]
    _, first_rev = np.unique(rev, return_index=True)
    return np.sort(len(ids) - 1 - first_rev)


def replay(mode: str, params: Params, days: list[Day], up: Upstream, seed: int, unit: PoolUnit = "snapshot",
           staleness: int = 1) -> tuple[dict[str, list[np.ndarray]], dict[str, float | None]]:
    """Replays the window's requests in one mode; what each impression was served.

    Args:
        days: ``up.lead`` warm-up days (daily batch only), then the window's days (requests from its second on).
        unit: The pool unit of serving's writes (``snapshot`` | ``write``).
        staleness: Offline only: the batch read on day ``t`` is the one written after day ``t - staleness``.

    Returns:
        ``(served, stats)``: per read source (``served``; for offline also ``raw``) the fp16 ``[n_t, K, D]``
        values of each window day's impressions (NaN rows: nothing served), and ``coverage`` / ``fallback_rate``.
    """
    if mode not in ("offline", *ONLINE_MODES):
        raise ValueError(f"unknown replayed mode {mode!r}")
    cfg, ev = params.study, params.events
    k, d = params.model.num_embeddings, params.model.embedding_dim
    population = np.unique(np.concatenate([day.users["user_id"].to_numpy() for day in days]))
    slots = Slots.empty(len(population), k, d)
    batch_served: list[np.ndarray] = []   # offline: the pooled / raw value after each day's batch
    batch_raw: list[np.ndarray] = []
    out: dict[str, list[np.ndarray]] = {"served": [], **({"raw": []} if mode == "offline" else {})}
    last_ms, n_all, n_fell = 0, 0, 0
    for i, day in enumerate(days):
        t = i - up.lead
        if t >= 1:
            users = day.frame[ev.user_id].to_numpy()
            rows = np.asarray(day.rows)
            where = np.searchsorted(population, users)
            n_all += len(users)
            if mode == "offline":
                j = i - staleness
                for source, held in (("served", batch_served), ("raw", batch_raw)):
                    got = held[j][where] if 0 <= j < len(held) else np.full((len(users), k, d), np.nan, np.float16)
                    out[source].append(np.where((rows >= 0)[:, None, None], got, np.float16(np.nan)))
            else:
                served, fell, last_ms = _online_day(mode, cfg, event_ms(day.frame[ev.timestamp]), users, rows,
                                                    where, up, t, seed, slots, unit, last_ms)
                n_fell += fell
                out["served"].append(served)  # fp16 as stored: the downstream casts once
        if i < len(days) - 1:  # the daily batch after the day
            written = max(end_of_day_ms(day.ds), last_ms + 1)
            at = np.searchsorted(population, day.users["user_id"].to_numpy()[day.latest])
            new, _ = shift_in(slots.take(at), up.batch[i], up.batch_ids[i], written, unit)
            slots.put(at, new)
            last_ms = written
            if mode == "offline":
                batch_served.append(pool(slots.values)[0])
                batch_raw.append(slots.values[:, 0].copy())
    coverage = float(sum(np.isfinite(a[:, 0, 0]).sum() for a in out["served"]) / max(n_all, 1))
    return out, {"coverage": coverage, "fallback_rate": n_fell / max(n_all, 1) if mode == "realtime" else None}


def _online_day(mode, cfg, ms: np.ndarray, users, rows, where, up: Upstream, t: int, seed: int, slots: Slots,
                unit: PoolUnit, last_ms: int) -> tuple[np.ndarray, int, int]:
    """One window day of async or realtime requests, a request batch at a time (write times as the store's)."""
    n = len(users)
    k, d = slots.values.shape[2:]
    fresh, sid = up.fresh[t - 1], up.fresh_ids[t - 1]
    fell = fallbacks(seed, t, n, cfg.realtime_fallback_rate) if mode == "realtime" else np.zeros(n, bool)
    served = np.full((n, k, d), np.nan, np.float16)
    for lo in range(0, n, cfg.replay_batch):
        hi = min(lo + cfg.replay_batch, n)
        at = where[lo:hi]
        before = pool(slots.values[at])[0]
        if mode == "async":      # answered from the cache, recomputed after the answers
            written = max(int(ms[hi - 1]) + 1, last_ms + 1)
            served[lo:hi] = before
        else:                    # computed before answering
            written = max(int(ms[lo]) - 1, last_ms + 1)
        known = np.flatnonzero(rows[lo:hi] >= 0)
        if len(known):
            keep = known[last_of_each(users[lo:hi][known])]
            target = at[keep]
            new, _ = shift_in(slots.take(target), fresh[rows[lo:hi][keep]], sid, written, unit)
            slots.put(target, new)
            last_ms = written
        if mode == "realtime":
            after = pool(slots.values[at])[0]
            served[lo:hi] = np.where(fell[lo:hi, None, None], before, after)
    served[rows < 0] = np.nan
    return served, int(fell.sum()), last_ms
