"""The serving replay through a real Feast store: the reference the in-memory replay (``study_replay.py``) is
checked against, bit for bit, on a small case (``tests/integration/test_study_replay.py``). Not used by the study.

Each mode writes through serving's own store code (:func:`serving.store_io.write_embeddings`: pooling, write-back
order, the offline log) in a workspace of its own, with the write times the in-memory replay orders by, and reads
back what each impression was served through Feast's point-in-time join over the offline log
(:func:`sum_platform.feature_store.historical_embeddings`). Distinct impression times are assumed: where two share
a millisecond at a request batch's edge, a point-in-time read cannot tell the writes apart (the in-memory replay
orders them explicitly).
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from serving.store_io import write_embeddings
from sum_pipeline.retrain_downstream import embeddings_of
from sum_pipeline.study_data import Day
from sum_pipeline.study_replay import end_of_day_ms, event_ms, fallbacks, last_of_each
from sum_pipeline.study_upstream import Upstream
from sum_platform.config import Params
from sum_platform.feature_store import apply_definitions, historical_embeddings, workspace_in_force


def store_supports_unit() -> str | None:
    """The name of ``write_embeddings``' pool-unit argument, None while serving pools only by writes."""
    names = inspect.signature(write_embeddings).parameters
    return next((n for n in ("unit", "pool_unit") if n in names), None)


def replay_store(mode: str, params: Params, days: list[Day], up: Upstream, seed: int, workspace: Path,
                 unit: str = "write") -> tuple[dict[str, list[np.ndarray]], dict[str, float | None]]:
    """Replays the window's requests in one mode through the store; reads back what each impression got.

    Same arguments and results as :func:`sum_pipeline.study_replay.replay` (offline with a 1-day staleness: the
    latest batch a point-in-time read finds).
    """
    cfg, ev = params.study, params.events
    arg = store_supports_unit()
    if arg is None and unit != "write":
        raise ValueError("serving.store_io.write_embeddings pools by writes only")
    extra = {arg: unit} if arg else {}
    shutil.rmtree(workspace, ignore_errors=True)  # a rerun starts from the same empty store
    workspace.mkdir(parents=True)
    with workspace_in_force(workspace):
        store = apply_definitions(params)  # params.workspace is $SUM_WORKSPACE: the mode's folder
        last_ms, lookups, n_fell = 0, [], 0
        for i, day in enumerate(days):
            t = i - up.lead
            if t >= 1:
                users = day.frame[ev.user_id].to_numpy()
                rows = np.asarray(day.rows)
                ms = event_ms(day.frame[ev.timestamp])
                lookup_ms = ms.copy()
                fresh, sid = up.fresh[t - 1], up.fresh_ids[t - 1]
                fell = fallbacks(seed, t, len(users), cfg.realtime_fallback_rate)
                if mode == "realtime":
                    n_fell += int(fell.sum())
                for lo in range(0, len(users) if mode != "offline" else 0, cfg.replay_batch):
                    hi = min(lo + cfg.replay_batch, len(users))
                    if mode == "async":
                        written = max(int(ms[hi - 1]) + 1, last_ms + 1)
                    else:
                        written = max(int(ms[lo]) - 1, last_ms + 1)
                        lookup_ms[lo:hi] = np.where(fell[lo:hi], written - 1, np.maximum(lookup_ms[lo:hi], written))
                    known = np.flatnonzero(rows[lo:hi] >= 0)
                    if len(known):
                        keep = known[last_of_each(users[lo:hi][known])]
                        write_embeddings(store, users[lo:hi][keep], fresh[rows[lo:hi][keep]], sid, written,
                                         to_offline=True, **extra)
                        last_ms = written
                lookups.append(pd.DataFrame({"user_id": users,
                                             "event_ts": pd.to_datetime(lookup_ms, unit="ms", utc=True)}))
            if i < len(days) - 1:
                written = max(end_of_day_ms(day.ds), last_ms + 1)
                latest = day.latest
                write_embeddings(store, day.users["user_id"].to_numpy()[latest], up.batch[i], up.batch_ids[i], written,
                                 batch=True, to_offline=True, offline_file="batch.parquet", **extra)
                last_ms = written
        k, d = params.model.num_embeddings, params.model.embedding_dim
        sources = ("served", "raw") if mode == "offline" else ("served",)
        served = {source: [embeddings_of(historical_embeddings(store, day, k, source=source), k, d)
                           for day in lookups] for source in sources}
    n = sum(len(day) for day in lookups)
    coverage = float(sum(np.isfinite(a[:, 0, 0]).sum() for a in served["served"]) / max(n, 1))
    return served, {"coverage": coverage, "fallback_rate": n_fell / max(n, 1) if mode == "realtime" else None}
