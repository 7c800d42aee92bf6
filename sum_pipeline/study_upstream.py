"""The study's upstream: the SUM model trained day by day (warm start, as the daily DAG does), and what it computes
for the replay.

``warm`` days before the window train the model first (paper §6.4's mature model); the frozen arm serves the last
warm-up snapshot for the whole window (without a warm-up, the window's first snapshot ``S_0``). Then ``S_t`` is
trained on window day ``t``. A snapshot is served only once the gate blesses it (``sum_pipeline/study_gate.py``,
when present); otherwise the last blessed one keeps serving, and the daily batch is computed with it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sum_models.shift import POOL_DEPTH
from sum_pipeline.study_data import Day
from sum_pipeline.tasks import holdout_mask, warm_start
from sum_platform.config import Params
from sum_platform.workspace import snapshot_id_for

try:  # the gate deciding which snapshots the study serves (every snapshot before it lands)
    from sum_pipeline import study_gate
except ImportError:  # pragma: no cover
    study_gate = None

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
    gate: list[dict[str, Any]] = field(default_factory=list)       # {"ds", "candidate", "blessed", "serving"}
    candidate_fresh: list[np.ndarray] = field(default_factory=list)  # S_{t-1} on day t's rows (Table 3's split)


def _mean_l2(emb: np.ndarray) -> list[float]:
    return [float(v) for v in np.linalg.norm(emb.astype(np.float32), axis=2).mean(axis=0)] if len(emb) else []


def gate_function() -> Callable[..., Any] | None:
    """The study gate (``sum_pipeline.study_gate``) when it exists: decides per day whether a candidate is blessed."""
    if study_gate is None:
        return None
    for name in ("blessed", "is_blessed", "bless", "gate_snapshot", "judge_snapshot"):
        fn = getattr(study_gate, name, None)
        if callable(fn):
            return fn
    return None


def _call_gate(fn: Callable[..., Any], available: dict[str, Any]) -> bool:
    """Calls the gate with the arguments it names (of those the study has); its answer as a bool (a dict's
    ``blessed`` / ``promote`` key, or truthiness)."""
    wanted = inspect.signature(fn).parameters
    out = fn(**{k: v for k, v in available.items() if k in wanted})
    if isinstance(out, dict):
        return bool(out.get("blessed", out.get("promote", out.get("passed"))))
    if isinstance(out, tuple):
        return bool(out[0])
    return bool(getattr(out, "blessed", out))


def train_upstream(params: Params, spec, warm: list[Day], days: list[Day], seed: int, progress: Progress,
                   lead: int = POOL_DEPTH) -> Upstream:
    """Trains the warm-up days, then ``S_0 .. S_{D-2}`` on the window's days, and computes what the replay serves.

    Args:
        warm: The warm-up days (oldest first); their last ``lead`` also run the daily batch (the rows the
            window's first pools and a stale offline batch read).
        days: The window's days.
    """
    import torch  # the model stack: loaded by the study's run only

    from sum_models.model import build_model
    from sum_models.snapshot import embed_users
    from sum_models.train import ne_accumulator, train_model

    out = Upstream(lead=min(lead, len(warm)))
    gate = gate_function()
    timeline = [*warm, *days[:-1]]   # every day the upstream trains on
    batch_from = len(warm) - out.lead
    prev_state = None
    production, production_id, production_ne = None, None, None
    history: list[np.ndarray] = []   # the served snapshots' versions of the probe (gate input)
    for i, day in enumerate(timeline):
        t = i - len(warm)            # window index (negative: warm-up)
        model = build_model(spec, params.model.model_dump(), seed=seed)
        if prev_state is not None:
            warm_start(model, prev_state)
        holdout = holdout_mask(day.frame, params.events.holdout_fraction)
        # the window's day t trains with seed + t (as without a warm-up); the warm-up's days with seeds of their own
        train_seed = seed + t if t >= 0 else seed + _WARMUP_SEEDS + i
        train_model(model, day.frame[~holdout].reset_index(drop=True), spec, params.train.model_dump(),
                    seed=train_seed, progress=False)
        model.eval()
        ne = ne_accumulator(model, day.frame[holdout].reset_index(drop=True), spec).compute_defined()[0]
        latest = day.users.iloc[day.latest].reset_index(drop=True)
        with torch.no_grad():
            candidate = embed_users(model.user_tower, latest, spec)
        cid = snapshot_id_for(day.ds)
        blessed = True
        if gate is not None and production is not None:
            blessed = _call_gate(gate, {"params": params, "candidate": candidate, "candidate_embeddings": candidate,
                                        "production": production_emb(production, latest, spec),
                                        "history": history, "candidate_ne": ne, "production_ne": production_ne,
                                        "ne": ne, "ds": day.ds, "day": i, "warmup": t < 0})
        if blessed:
            production, production_id, production_ne = model, cid, ne
        out.gate.append({"ds": day.ds, "candidate": cid, "blessed": bool(blessed), "serving": production_id,
                         "gated": gate is not None})
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
                out.candidate_fresh.append(out.fresh[-1] if production is model
                                           else embed_users(model.user_tower, nxt.users, spec))
                out.frozen.append(out.fresh[-1] if frozen is production else embed_users(frozen.user_tower, nxt.users, spec))
            out.fresh_ids.append(production_id)
        prev_state = model.state_dict()
        progress(f"upstream seed {seed}", 1)
    return out


def production_emb(model, users, spec) -> np.ndarray:
    import torch

    from sum_models.snapshot import embed_users

    with torch.no_grad():
        return embed_users(model.user_tower, users, spec)


def holdout_label_ne(up: Upstream, label: str) -> list[float]:
    return [ne.get(label, math.nan) for ne in up.holdout_ne]
