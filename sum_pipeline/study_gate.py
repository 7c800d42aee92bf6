"""The snapshot gate run over a study's chain of daily snapshots: which snapshot serves each next day.

The daily loop judges each candidate against production (``sum_pipeline.tasks.shift_gate``) and promotes only a
blessed one; a held candidate leaves production serving. A study that serves every day's snapshot skips that
step, so :func:`gate_chain` replays it over arrays: day ``t``'s candidate is snapshot ``t``; it is judged by
:func:`validation.gate.judge` with the params' thresholds against the last blessed snapshot (production), the
blessed ones before it feeding the pooled comparison, newest first, and the shift enforced only once
``gate.warmup_promotions`` snapshots have been promoted (as ``shift_gate`` does). Nothing here reads a store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sum_models.shift import POOL_DEPTH, mean_norms
from sum_platform.config import GateConfig
from sum_platform.embedding_row import PoolUnit
from validation.gate import judge

__all__ = ["ChainDay", "GateChain", "gate_chain", "held_days"]

NE = Mapping[str, float]


@dataclass(frozen=True)
class ChainDay:
    """The gate's decision on day ``t``'s candidate (snapshot ``t``).

    Attributes:
        day: t.
        blessed: The candidate was blessed (and promoted).
        baseline: Index of the production snapshot it was judged against (None: no snapshot blessed yet).
        serves_next: Index of the snapshot serving day ``t + 1`` (production after this decision; None: none
            blessed yet, so nothing is served).
        shift_enforced: False during the warm-up (fewer than ``gate.warmup_promotions`` promotions before it).
        mean_norm: The candidate's mean L2 norm per embedding on the probe users (logged, not checked).
        reasons: The verdict's reasons (failed checks first named there).
        checks: The verdict's checks as dicts (``name``, ``value``, ``threshold``, ``op``, ``passed``).
    """

    day: int
    blessed: bool
    baseline: int | None
    serves_next: int | None
    shift_enforced: bool
    mean_norm: list[float]
    reasons: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "blessed" if self.blessed else "held"


def _snapshot_id(day: int) -> str:
    """Snapshot ``day``'s id for the pooling rule (which tells versions apart by id): one per day."""
    return f"study-snapshot-{day}"


def gate_chain(
    probe: Sequence[np.ndarray],
    candidate_ne: Sequence[NE],
    production_ne: Callable[[int, int], NE | None],
    cfg: GateConfig,
    *,
    weights_finite: Sequence[bool] | None = None,
    pool_unit: PoolUnit = "snapshot",
) -> list[ChainDay]:
    """Gates each day's snapshot against the last blessed one, as the daily loop does.

    Args:
        probe: Per day ``t``, snapshot ``t``'s embeddings of the fixed probe users, ``[N, K, D]`` (same users,
            same order every day).
        candidate_ne: Per day ``t``, snapshot ``t``'s NE per task on day ``t``'s holdout.
        production_ne: ``production_ne(t, j)``: snapshot ``j``'s NE per task on day ``t``'s holdout (``j < t``,
            the production the chain has reached; called only then), or None to skip the regression check.
        cfg: ``params.gate``.
        weights_finite: Per day, whether every weight of snapshot ``t`` is finite (default: all are).
        pool_unit: ``serving.pool_unit`` the pooled comparison assumes (the study's arm: snapshot or write).

    Returns:
        One :class:`ChainDay` per day, in order.

    Raises:
        ValueError: The sequences differ in length, or the probe arrays in shape.
    """
    days = len(probe)
    if len(candidate_ne) != days or (weights_finite is not None and len(weights_finite) != days):
        raise ValueError(f"{days} probe arrays but {len(candidate_ne)} NE entries"
                         + ("" if weights_finite is None else f" and {len(weights_finite)} weights_finite flags"))
    chain = GateChain(cfg, pool_unit)
    for t in range(days):
        chain.step(probe[t], candidate_ne[t], production_ne,
                   True if weights_finite is None else bool(weights_finite[t]))
    return chain.days


class GateChain:
    """:func:`gate_chain` one day at a time (a day's decision depends only on the days before it): the study's
    upstream judges each snapshot as it is trained, in time linear in the days.

    Example::

        >>> import numpy as np
        >>> from sum_platform.config import load_params
        >>> chain = GateChain(load_params().gate)
        >>> probe = np.random.default_rng(0).normal(size=(64, 2, 8)).astype(np.float16)  # [N, K, D]
        >>> chain.step(probe, {"click": 0.9}, lambda t, j: None).reasons[-1]
        'first snapshot: no baseline, absolute checks only'
        >>> chain.step(np.ones_like(probe), {"click": 0.9}, lambda t, j: None).blessed  # collapsed: held
        False
    """

    def __init__(self, cfg: GateConfig, pool_unit: PoolUnit = "snapshot") -> None:
        self.cfg, self.pool_unit = cfg, pool_unit
        self.probe: list[np.ndarray] = []
        self.promoted: list[int] = []  # blessed snapshots, newest first (the registry's promotion history)
        self.days: list[ChainDay] = []

    def step(self, probe: np.ndarray, candidate_ne: NE, production_ne: Callable[[int, int], NE | None],
             weights_finite: bool = True, evidence: Mapping[str, Mapping[str, int]] | None = None,
             unmeasured: Mapping[str, str] | None = None, consumers: list[dict] | None = None) -> ChainDay:
        """Judges the next day's candidate (its probe embeddings ``[N, K, D]`` and holdout NE per task).

        ``evidence`` (task -> ``{"holdout_rows", "positives"}``) and ``unmeasured`` (task -> why its NE is undefined)
        are what the DAG's evaluate task hands the gate: with them, an NE resting on fewer than
        ``gate.min_label_count`` of either label is not measurable, as in the daily loop. ``consumers``: the
        consumer check's rows (``sum_pipeline.check_consumers.measure_consumers``; None: not measured), judged by
        ``gate.mode`` as the DAG's shift_gate judges them.
        """
        probe = np.asarray(probe)
        if self.probe and probe.shape != self.probe[0].shape:
            raise ValueError(f"probe embeddings differ in shape across days: {[self.probe[0].shape, probe.shape]}")
        t, promoted, cfg = len(self.probe), self.promoted, self.cfg
        self.probe.append(probe)
        baseline = promoted[0] if promoted else None
        enforce = len(promoted) >= cfg.warmup_promotions
        verdict = judge(
            probe,
            None if baseline is None else self.probe[baseline],
            dict(candidate_ne),
            cfg,
            None if baseline is None else _snapshot_id(baseline),
            history=[self.probe[j] for j in promoted[1:POOL_DEPTH]],
            candidate_id=_snapshot_id(t),
            history_ids=[_snapshot_id(j) for j in promoted[1:POOL_DEPTH]],
            pool_unit=self.pool_unit,
            production_ne=None if baseline is None else production_ne(t, baseline),
            weights_finite=bool(weights_finite),
            unmeasured=dict(unmeasured or {}),
            ne_evidence=evidence,
            enforce_shift=enforce,
            consumers=consumers,
        )
        if verdict.blessed:
            promoted.insert(0, t)
        day = ChainDay(
            day=t,
            blessed=verdict.blessed,
            baseline=baseline,
            serves_next=promoted[0] if promoted else None,
            shift_enforced=enforce and baseline is not None,
            mean_norm=mean_norms(probe),
            reasons=list(verdict.reasons),
            checks=[asdict(c) for c in verdict.checks],
        )
        self.days.append(day)
        return day


    def approve_last(self) -> None:
        """Promotes the last judged candidate although the gate held it, as an operator's approval in Required
        Actions does: it serves next and is the next candidate's baseline (its day stays marked held)."""
        day = self.days[-1]
        if not day.blessed and (not self.promoted or self.promoted[0] != day.day):
            self.promoted.insert(0, day.day)
            self.days[-1] = replace(day, serves_next=day.day)


def held_days(chain: Sequence[ChainDay]) -> list[int]:
    """The days whose candidate the gate held (the study's report counts them)."""
    return [d.day for d in chain if not d.blessed]
