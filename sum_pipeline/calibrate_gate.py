"""``sumctl calibrate --gate``: a source's days replayed through the snapshot gate, each check's observed range next
to the threshold in force.

The daily loop in one process, as the DAG runs it: each day's candidate warm-starts from production, trains on the
day's impressions (the holdout and the consumer-holdout users left out), is scored on the holdout and judged by
:class:`sum_pipeline.study_upstream.SnapshotGate` (the study's gate) with the params' thresholds against
production, on the fixed probe users. The days are the source's normal days, so every candidate is promoted: a held
one as an operator's approval would (its verdict is kept), so a hold never changes what later days are judged
against. For every check it reports the values
normal days measured (days the check was measured and not in the warm-up), the threshold, and the margin between
the threshold and the worst normal value: what to set when a new source's thresholds are chosen, on days other than
the ones they will judge. The consumer checks come from :class:`sum_pipeline.consumer_replay.ConsumerReplay`: each
promotion trains the downstream models on its day with what serving handed out (as ``sum_downstream`` does), and
the next days' candidates are scored on them by the DAG's own ``measure_consumers`` (``gate.mode: proxies``: none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from sum_pipeline.consumer_replay import ConsumerReplay
from sum_pipeline.study_data import load_days
from sum_pipeline.study_upstream import SnapshotGate
from sum_pipeline.tasks import holdout_mask, warm_start
from sum_platform.config import Params
from sum_platform.feature_store import spec_from_fields, user_feature_fields
from sum_platform.workspace import snapshot_id_for
from validation.consumers import left_out_of_training

#: A check's family: its name without the embedding index (``embedding_1.mean_cosine`` -> ``embedding_k.mean_cosine``).
_INDEX = re.compile(r"embedding_\d+")


@dataclass
class GateCalibration:
    """Per day, every check the gate measured; :meth:`summary` folds them per check family."""

    days: list[dict[str, Any]] = field(default_factory=list)  # {"ds", "blessed", "checks": [...], "reasons"}

    def frame(self) -> pd.DataFrame:
        """One row per day and check: ds, check, value, threshold, op, outcome, enforced, blessed."""
        rows = [{"ds": d["ds"], "check": c["name"], "value": c["value"], "threshold": c["threshold"], "op": c["op"],
                 "outcome": c["outcome"], "enforced": c.get("enforced", True), "blessed": d["blessed"]}
                for d in self.days for c in d["checks"]]
        return pd.DataFrame(rows, columns=["ds", "check", "value", "threshold", "op", "outcome", "enforced",
                                           "blessed"])

    def summary(self) -> list[dict[str, Any]]:
        """Per check family: days measured, observed min and max, threshold, op, margin to the worst day (> 0:
        every measured day inside; the margin is in the check's own units) and days outside."""
        frame = self.frame()
        frame = frame[(frame["outcome"] != "not_measurable") & frame["value"].notna()]
        frame = frame.assign(family=frame["check"].str.replace(_INDEX, "embedding_k", regex=True))
        out = []
        for family, rows in frame.groupby("family", sort=True):
            op, threshold = rows["op"].iloc[0], float(rows["threshold"].iloc[0])
            values = rows["value"].astype(float)
            worst = values.max() if op == "<=" else values.min()
            margin = threshold - worst if op == "<=" else worst - threshold
            out.append({"check": family, "days": int(rows["ds"].nunique()), "min": float(values.min()),
                        "max": float(values.max()), "op": op, "threshold": threshold, "margin": float(margin),
                        "outside": int((rows["outcome"] == "fail").groupby(rows["ds"]).any().sum())})
        return out


def calibrate_gate(params: Params, n_days: int, progress: Callable[[str], None] | None = None,
                   seed: int | None = None) -> GateCalibration:
    """Replays the source's first ``n_days`` days through training and the gate (see the module docstring)."""
    import torch

    from sum_models.model import build_model
    from sum_models.snapshot import embed_users
    from sum_models.train import ne_accumulator, train_model

    seed = params.seed if seed is None else seed
    spec = spec_from_fields(user_feature_fields(params), params)
    gate = SnapshotGate(params, spec)  # the study's gate: probe users, production's NE, the chain
    consumers = ConsumerReplay(params, spec)  # the downstream models the promotions would have trained
    out = GateCalibration()
    production, prev_state = None, None
    for day in load_days(params, n_days):
        model = build_model(spec, params.model.model_dump(), seed=seed)
        if prev_state is not None:
            warm_start(model, prev_state)
        holdout = holdout_mask(day.frame, params.events.holdout_fraction)
        unseen = left_out_of_training(day.frame[params.events.user_id].to_numpy(), params.gate)
        train_model(model, day.frame[~holdout & ~unseen].reset_index(drop=True), spec, params.train.model_dump(),
                    seed=seed, progress=False)
        model.eval()
        holdout_frame = day.frame[holdout].reset_index(drop=True)
        latest = day.users.iloc[day.latest].reset_index(drop=True)
        with torch.no_grad():
            candidate = embed_users(model.user_tower, latest, spec)
        cid = snapshot_id_for(day.ds)
        table = consumers.measure(day, latest, candidate, cid)
        blessed, _, _ = gate.judge(day, latest, candidate, ne_accumulator(model, holdout_frame, spec), model,
                                   production, holdout_frame, consumers=table)
        # The days are normal by premise: a held one is approved (as an operator would), so every later day is
        # judged as after a normal promotion and a hold does not change what the following days are compared with.
        if not blessed:
            gate.chain.approve_last()
        consumers.after_day(day, latest, True, model, cid)
        production = model
        prev_state = production.state_dict()
        judged = gate.chain.days[-1]
        out.days.append({"ds": day.ds, "blessed": bool(blessed), "checks": judged.checks, "reasons": judged.reasons,
                         "consumers": table or []})
        if progress is not None:
            progress(day.ds)
    return out
