"""The DAG task ``check_consumers``: what each downstream model that exists would lose if the candidate were promoted.

Between ``evaluate`` and ``shift_gate``. The day's consumer holdout is every impression of the users the candidate
did not train on (``gate.consumer_holdout_users``, a fixed hash of the user id; ``tasks.training_frame`` leaves them
out). Their embeddings are computed from the day's users partition by the candidate, production and the older
promoted snapshots, and pooled by the row owner's rule into what serving hands out now and after the promotion
(``validation.gate.served_values``, as the pooled shift check does for the probe users). Each saved downstream model
(``downstream.models``, the latest weights of a day before this one, as saved) scores the rows with both, and its
twin without SUM scores them too; ``validation.consumers.measure_consumer`` turns that into the table row.

The table is the day record ``consumers`` (``runs/<ds>/consumers.json``), which ``shift_gate`` hands the gate.
Rerunning the task for a date gives the same table (same rows, same weights, a bootstrap seeded by the date).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sum_models.shift import POOL_DEPTH
from sum_pipeline.promotion import baseline_history
from sum_pipeline.retrain_downstream import latest_before, load_downstream
from sum_platform.context import context
from sum_platform.files import read_json
from sum_platform.partitions import read_partition
from sum_platform.sources import joined_day
from sum_platform.config import GateConfig
from sum_platform.workspace import snapshot_id_for
from validation.consumers import ConsumerEffect, consumer_users, measure_consumer
from validation.gate import served_values

log = logging.getLogger(__name__)


@dataclass
class Consumer:
    """A downstream model as the consumer check uses it: its weights with SUM and its twin's without.

    Attributes:
        unmeasurable_why: Non-empty: the model cannot judge a candidate (e.g. trained before anything was served);
            its row is *not measurable* with this reason.
    """

    name: str
    model: Any
    twin: Any | None = None
    model_day: str | None = None
    unmeasurable_why: str = ""


def measure_consumers(consumers: list[Consumer], frame: pd.DataFrame, users: np.ndarray, now: np.ndarray,
                      after: np.ndarray, cfg: GateConfig, seed: int) -> list[dict[str, Any]]:
    """Every consumer scored on the consumer holdout's rows with what serving hands out now and after the promotion.

    Args:
        consumers: The downstream models (as saved, or as a replay trained them).
        frame: The consumer-holdout impressions, joined with the users' features (``sum_platform.sources.joined_day``).
        users: ``[N]`` each row's user id.
        now, after: ``[N, K, D]`` each row's served embeddings now / after the promotion
            (``validation.gate.served_values`` at the row's user).
        cfg: ``params.gate`` (the tolerance, ``min_label_count``, the bootstrap's resamples).
        seed: The bootstrap's seed.

    Returns:
        One :class:`validation.consumers.ConsumerEffect` dict per consumer, in the given order.
    """
    from sum_models.downstream_train import DownstreamData, predict_downstream

    rows = []
    for c in consumers:
        spec = c.model.spec
        if c.unmeasurable_why:
            rows.append(ConsumerEffect(
                consumer=c.name, rows=len(frame), users=int(len(np.unique(users))), positives=int(frame[spec.label].sum()),
                ne={}, change_pct=None, change_ci=None, worse_share=None, vs_without_pct=None, vs_without_ci=None,
                threshold_pct=cfg.consumer_max_ne_regression_pct, outcome="not_measurable", why=c.unmeasurable_why,
                model_day=c.model_day).to_dict())
            continue
        data = {arm: DownstreamData.from_frame(spec, frame, values.astype(np.float32))
                for arm, values in (("now", now), ("after", after))}
        preds = {arm: predict_downstream(c.model, rows_) for arm, rows_ in data.items()}
        p_without = None
        if c.twin is not None:
            p_without = predict_downstream(c.twin, DownstreamData.from_frame(c.twin.spec, frame, None))
        effect = measure_consumer(
            c.name, users, data["now"].labels.numpy(), preds["now"], preds["after"], p_without,
            min_label_count=cfg.min_label_count, max_regression_pct=cfg.consumer_max_ne_regression_pct,
            worse_tolerance=cfg.consumer_worse_tolerance, resamples=cfg.consumer_bootstrap, seed=seed,
            model_day=c.model_day)
        rows.append(effect.to_dict())
        log.info("%s", effect.line())
    return rows


def check_consumers(ds: str, snapshot_id: str | None = None) -> dict[str, Any]:
    """Measures every saved downstream model on the day's consumer holdout; writes and returns the table.

    Returns:
        ``{"ds", "snapshot_id", "mode", "users", "rows", "consumers": [ConsumerEffect dicts], "note"}``; ``note``
        says why the table is empty (``gate.mode: proxies``, no production yet, no consumer saved yet, no consumer
        holdout rows).
    """
    from sum_models.snapshot import embed_users_finite, load_user_tower
    from sum_platform.downstream_inputs import downstream_specs_for

    ctx = context()
    params, ws = ctx.params, ctx.ws
    cfg = params.gate
    snapshot_id = snapshot_id or snapshot_id_for(ds)
    out: dict[str, Any] = {"ds": ds, "snapshot_id": snapshot_id, "mode": cfg.mode, "users": 0, "rows": 0,
                           "consumers": [], "note": ""}

    def done(note: str = "") -> dict[str, Any]:
        out["note"] = note
        ctx.day(ds).write("consumers", out)
        if note:
            log.info("consumer check of %s: %s", snapshot_id, note)
        return out

    if cfg.mode == "proxies":
        return done("gate.mode is proxies: the consumers are not measured")
    history = baseline_history(snapshot_id, ctx)
    if not history:
        return done("no production snapshot yet: nothing is served now to compare with")
    consumers = {}
    for name in params.downstream.models:
        root = ws.root / "downstream" / name
        with_sum, without_sum = latest_before(root / "with_sum", ds), latest_before(root / "without_sum", ds)
        if with_sum is not None:
            consumers[name] = (with_sum, without_sum)
    if not consumers:
        return done("no consumer yet: no downstream model was saved before this day")

    ev = params.events
    events, users = read_partition(ws.events_dir(ds)), read_partition(ws.users_dir(ds))
    events = events[consumer_users(events[ev.user_id].to_numpy(), cfg.consumer_holdout_users)]
    frame = joined_day(events, users, params).reset_index(drop=True)
    if frame.empty:
        return done("no impression of a consumer-holdout user today")
    # Each user's features as of the day's end (their latest users row), the same for every snapshot.
    people = (users[users[ev.user_id].isin(frame[ev.user_id].unique())].sort_values(ev.timestamp, kind="stable")
              .drop_duplicates(ev.user_id, keep="last").sort_values(ev.user_id).reset_index(drop=True))
    embeddings = []
    skipped = np.zeros(len(people), dtype=bool)
    for sid in [snapshot_id, *history[:POOL_DEPTH]]:
        tower, _ = load_user_tower(ws.snapshot_dir(sid))
        emb, why = embed_users_finite(tower, people, tower.spec)
        skipped |= why != ""
        embeddings.append(emb)
    now, after = served_values(embeddings[0], embeddings[1], embeddings[2:], snapshot_id, history[0],
                               history[1:len(embeddings) - 1], params.serving.pool_unit)
    # A user no snapshot can embed (non-finite inputs) has nothing served: scored by neither arm.
    keep_people = ~skipped
    at = pd.Index(people[ev.user_id]).get_indexer(frame[ev.user_id])
    rows = keep_people[at]
    frame, at = frame[rows].reset_index(drop=True), at[rows]
    out["users"], out["rows"] = int(len(np.unique(at))), int(len(frame))
    specs = downstream_specs_for(params)
    seed = params.seed + int(pd.Timestamp(ds).toordinal())
    saved = []
    for name, (with_sum, without_sum) in consumers.items():
        model = load_downstream(with_sum)
        if specs.get(name) is None or model.spec != specs[name]:
            log.warning("consumer %s: its saved model (%s) was built for other inputs than today's; skipped",
                        name, with_sum.name)
            continue
        coverage = (read_json(with_sum / "metrics.json") if (with_sum / "metrics.json").is_file() else {}).get(
            "embedding_coverage")
        # Trained on a day when nothing was served yet (the first promoted day): its embedding inputs are untrained,
        # so what they do with any embedding says nothing about the candidate. No row left to score: e.g. a diverged
        # candidate embeds nobody (the finite checks hold it).
        why = ("" if coverage else f"its model ({with_sum.name[3:]}) was trained when no embedding had been served "
               "yet") or ("" if len(frame) else f"none of the {len(people)} consumer-holdout users has finite "
                          "embeddings under the candidate and every pooled snapshot")
        saved.append(Consumer(name, model, load_downstream(without_sum) if without_sum is not None else None,
                              model_day=with_sum.name[3:], unmeasurable_why=why))
    out["consumers"] = measure_consumers(saved, frame, frame[ev.user_id].to_numpy(), now[at], after[at], cfg, seed)
    return done("" if out["consumers"] else "no consumer model matches today's inputs")
