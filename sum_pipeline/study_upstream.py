"""The study's upstream: the SUM model trained day by day (warm start, as the daily DAG does), and what it computes
for the replay.

``warm`` days before the window train the model first (paper §6.4's mature model); the frozen arm serves the last
warm-up snapshot for the whole window (without a warm-up, the window's first snapshot ``S_0``). Then ``S_t`` is
trained on window day ``t``. A snapshot is served only once the gate blesses it (``sum_pipeline/study_gate.py``,
when present); otherwise the last blessed one keeps serving, and the daily batch is computed with it. The
consumer-gated arm's chain (``consumer_gate``) is gated by the consumer check alone. Every chain leaves the consumer
check's users out of training, as the DAG does (``gate.consumer_holdout_users``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from sum_models.shift import POOL_DEPTH
from sum_pipeline.consumer_replay import ConsumerReplay
from sum_pipeline.study_data import Day
from sum_pipeline.tasks import holdout_mask, warm_start
from sum_platform.config import Params
from sum_platform.workspace import snapshot_id_for
from validation.consumers import consumer_line, left_out_of_training

from sum_pipeline import study_gate

Progress = Callable[[str, int], None]  # (what, how many steps were added) -> None
#: Offset of the warm-up days' training seeds (clear of the window's ``seed + t``).
_WARMUP_SEEDS = 100_000


@dataclass
class Upstream:
    """What the daily upstream computed for one seed (fp16 ``[N, K, D]`` arrays on ``Day.users`` rows).

    The replay's days are ``lead`` warm-up days (daily batch only) followed by the window's days; ``batch[i]`` is
    the daily batch after replay day ``i`` (the production snapshot on the day's users' latest rows, ``Day.latest``
    order), ``fresh[t - 1]`` the snapshot serving window day ``t`` on every user row of that day (intra-day rows
    included), ``frozen[t - 1]`` the frozen snapshot on the same rows.
    """

    batch: list[np.ndarray] = field(default_factory=list)
    fresh: list[np.ndarray] = field(default_factory=list)
    frozen: list[np.ndarray] = field(default_factory=list)
    batch_ids: list[str] = field(default_factory=list)
    fresh_ids: list[str] = field(default_factory=list)
    lead: int = 0
    frozen_id: str | None = None
    holdout_ne: list[dict[str, float]] = field(default_factory=list)
    norms: list[dict[str, Any]] = field(default_factory=list)      # {"ds", "embedding", "mean_l2", "served"}
    gate: list[dict[str, Any]] = field(default_factory=list)       # {"ds", "candidate", "blessed", "serving", ...}


def _mean_l2(emb: np.ndarray) -> list[float]:
    return [float(v) for v in np.linalg.norm(emb.astype(np.float32), axis=2).mean(axis=0)] if len(emb) else []


class SnapshotGate:
    """The daily gate over the study's chain of snapshots (``sum_pipeline.study_gate.gate_chain``): day ``i``'s
    candidate is judged against the last blessed snapshot, as the daily loop judges it; a held candidate leaves
    the last blessed one serving (and computing the daily batch)."""

    def __init__(self, params: Params, spec) -> None:
        self.params, self.spec = params, spec
        self.probe_ids: np.ndarray | None = None
        self.chain = study_gate.GateChain(params.gate, pool_unit=params.serving.pool_unit)

    def judge(self, day: Day, latest, candidate: np.ndarray, scored, model, production,
              holdout_frame, consumers: list[dict] | None = None) -> tuple[bool, list[str], list[float]]:
        """Whether the day's candidate is blessed, the reasons, and its mean norm on the probe.

        ``scored`` is the candidate's NE accumulator over the day's holdout: its NE, the tasks it leaves undefined
        and how many rows and positives each rests on (``gate.min_label_count``), as the DAG's evaluate task hands
        them to the gate. ``consumers``: the consumer check's rows, or None when the replay measures none.
        """
        import torch

        from sum_models.train import ne_accumulator

        ids = latest["user_id"].to_numpy()
        if self.probe_ids is None:
            self.probe_ids = np.sort(ids)[:self.params.gate.probe_users]  # the first day's, as the DAG's
        at = pd.Index(ids).get_indexer(self.probe_ids)
        if (at < 0).any():  # a probe user without a row today: the gate needs the same users every day
            raise ValueError(f"{int((at < 0).sum())} gate probe users have no row on {day.ds}")
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())

        def production_ne(t: int, j: int) -> dict:
            # production's NE on today's holdout (the regression check's baseline): the chain asks only when it has
            # a blessed baseline, which is then `production`
            return ne_accumulator(production, holdout_frame, self.spec).compute_defined()[0]

        ne, unmeasured = scored.compute_defined()
        last = self.chain.step(candidate[at], ne, production_ne, finite, evidence=scored.evidence(),
                               unmeasured=unmeasured, consumers=consumers)
        return bool(last.blessed), list(last.reasons), list(last.mean_norm)


def train_upstream(params: Params, spec, warm: list[Day], days: list[Day], seed: int, progress: Progress,
                   lead: int = POOL_DEPTH, consumer_gate: bool = False) -> Upstream:
    """Trains the warm-up days, then ``S_0 .. S_{D-2}`` on the window's days, and computes what the replay serves.

    Args:
        warm: The warm-up days (oldest first); their last ``lead`` also run the daily batch (the rows the
            window's first pools and a stale offline batch read).
        days: The window's days.
        consumer_gate: The chain of the study's consumer-gated arm: a snapshot serves only when the consumer check
            passes it (no measured consumer fails: ``check_consumers.measure_consumers`` on the downstream models
            the promotions trained, :class:`~sum_pipeline.consumer_replay.ConsumerReplay`), whatever the proxies
            say; ``study.gate_snapshots`` does not apply. A held candidate leaves the last passed one serving, and
            the next candidate warm-starts from it, as in the daily loop.
    """
    import torch  # the model stack: loaded by the study's run only

    from sum_models.model import build_model
    from sum_models.snapshot import embed_users
    from sum_models.train import ne_accumulator, train_model

    out = Upstream(lead=min(lead, len(warm)))
    gate = SnapshotGate(params, spec) if params.study.gate_snapshots and not consumer_gate else None
    consumers = ConsumerReplay(params, spec) if consumer_gate else None
    timeline = [*warm, *days[:-1]]   # every day the upstream trains on
    batch_from = len(warm) - out.lead
    prev_state = None
    production, production_id = None, None
    for i, day in enumerate(timeline):
        t = i - len(warm)            # window index (negative: warm-up)
        model = build_model(spec, params.model.model_dump(), seed=seed)
        if prev_state is not None:
            warm_start(model, prev_state)
        holdout = holdout_mask(day.frame, params.events.holdout_fraction)
        # As the DAG trains (tasks.training_frame): the consumer check's users are never trained on, in every chain
        # of the study, so the consumer-gated arm differs from the others by its gate alone.
        unseen = left_out_of_training(day.frame[params.events.user_id].to_numpy(), params.gate)
        # the window's day t trains with seed + t (as without a warm-up); the warm-up's days with seeds of their own
        train_seed = seed + t if t >= 0 else seed + _WARMUP_SEEDS + i
        train_cfg = params.train.model_dump() | ({} if t >= 0 else {"epochs": params.study.warmup_epochs})
        train_model(model, day.frame[~holdout & ~unseen].reset_index(drop=True), spec, train_cfg, seed=train_seed,
                    progress=False)
        model.eval()
        holdout_frame = day.frame[holdout].reset_index(drop=True)
        scored = ne_accumulator(model, holdout_frame, spec)
        ne = scored.compute_defined()[0]
        latest = day.users.iloc[day.latest].reset_index(drop=True)
        with torch.no_grad():
            candidate = embed_users(model.user_tower, latest, spec)
        cid = snapshot_id_for(day.ds)
        blessed, reasons, table = True, [], None
        if gate is not None:
            blessed, reasons, _ = gate.judge(day, latest, candidate, scored, model, production, holdout_frame)
        if consumers is not None:
            table = consumers.measure(day, latest, candidate, cid) or []
            blessed = not any(c["outcome"] == "fail" for c in table)
            reasons = [consumer_line(c) for c in table]
            consumers.after_day(day, latest, blessed or production is None, model, cid)
        if blessed or production is None:  # nothing blessed yet: the first snapshot serves (marked below)
            production, production_id = model, cid
        out.gate.append({"ds": day.ds, "candidate": cid, "blessed": bool(blessed), "serving": production_id,
                         "gated": "consumers" if consumers is not None else gate is not None, "warmup": t < 0,
                         "reasons": reasons, **({} if table is None else {"consumers": table})})
        for k, v in enumerate(_mean_l2(candidate)):
            out.norms.append({"ds": day.ds, "embedding": k, "mean_l2": v, "warmup": t < 0})
        if t >= 0:
            out.holdout_ne.append(ne)
        if i >= batch_from:
            with torch.no_grad():
                batch = candidate if production is model else embed_users(production.user_tower, latest, spec)
            out.batch.append(batch)
            out.batch_ids.append(production_id)
        if t == -1 or (t == 0 and not warm):
            out.frozen_id, frozen = production_id, production
        if t >= 0:  # the next window day is served by today's production snapshot
            nxt = days[t + 1]
            with torch.no_grad():
                out.fresh.append(embed_users(production.user_tower, nxt.users, spec))
                out.frozen.append(out.fresh[-1] if frozen is production else embed_users(frozen.user_tower, nxt.users, spec))
            out.fresh_ids.append(production_id)
        prev_state = production.state_dict()  # the next candidate warm-starts from production (as the DAG's)
        progress(f"upstream seed {seed}", 1)
    return out
