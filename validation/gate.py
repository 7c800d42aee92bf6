"""Snapshot gate: judges a candidate against the production snapshot (paper 5.2, Table 3).

Checks, each recorded with its value and threshold:
    * absolute (every candidate, including the first one, which has no baseline): embeddings finite;
      per-embedding spread across users above ``min_embedding_std`` (no collapsed embedding); NE of every
      task at most ``max_ne``;
    * relative (when a production snapshot exists): per embedding, mean cosine similarity with production
      on the probe users at least ``min_mean_cosine`` and relative L2-norm change at most
      ``max_relative_l2_change``.
A gate with no thresholds configured refuses to bless anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sum_platform.config import GateConfig


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    threshold: float
    op: str  # "<=" or ">="
    passed: bool


@dataclass
class Verdict:
    """The gate's decision and everything that produced it."""

    blessed: bool
    baseline_snapshot_id: str | None
    checks: list[Check] = field(default_factory=list)
    shift: list[dict[str, float]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "blessed" if self.blessed else "held"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.label
        return d


def _check(name: str, value: float, threshold: float, op: str) -> Check:
    ok = bool(np.isfinite(value)) and (value <= threshold if op == "<=" else value >= threshold)
    return Check(name, float(value), float(threshold), op, ok)


def judge(
    candidate: np.ndarray,
    production: np.ndarray | None,
    ne: dict[str, float],
    cfg: GateConfig,
    baseline_snapshot_id: str | None = None,
) -> Verdict:
    """Judges a candidate snapshot.

    Args:
        candidate: Candidate embeddings of the probe users, [N, K, D].
        production: Production embeddings of the same users, [N, K, D], or None for the first snapshot.
        ne: Normalized Entropy of the candidate per task on the day's holdout.
        cfg: Gate thresholds from ``params.yaml``.
        baseline_snapshot_id: Id of the production snapshot compared against.

    Returns:
        The :class:`Verdict`; ``blessed`` only when every check passed.
    """
    from sum_models.shift import shift_metrics

    verdict = Verdict(blessed=False, baseline_snapshot_id=baseline_snapshot_id if production is not None else None)
    relative_configured = cfg.min_mean_cosine is not None and cfg.max_relative_l2_change is not None
    if cfg.max_ne is None or not relative_configured:
        verdict.reasons.append("gate thresholds are not configured (gate.max_ne, gate.min_mean_cosine, "
                               "gate.max_relative_l2_change): refusing to bless")
        return verdict

    cand = candidate.astype(np.float64)
    finite = bool(np.isfinite(cand).all())
    verdict.checks.append(Check("embeddings_finite", float(finite), 1.0, ">=", finite))
    if finite:
        for k in range(cand.shape[1]):
            spread = float(cand[:, k, :].std(axis=0).mean())
            verdict.checks.append(_check(f"embedding_{k}.std_across_users", spread, cfg.min_embedding_std, ">="))
    for task, value in sorted(ne.items()):
        verdict.checks.append(_check(f"ne.{task}", value, cfg.max_ne, "<="))

    if production is not None and finite:
        verdict.shift = shift_metrics(candidate, production)
        for k, m in enumerate(verdict.shift):
            verdict.checks.append(_check(f"embedding_{k}.mean_cosine", m["mean_cosine"], cfg.min_mean_cosine, ">="))
            verdict.checks.append(
                _check(f"embedding_{k}.relative_l2_change", m["relative_l2_change"], cfg.max_relative_l2_change, "<=")
            )
    elif production is None:
        verdict.reasons.append("first snapshot: no baseline, absolute checks only")

    failed = [c for c in verdict.checks if not c.passed]
    verdict.reasons.extend(f"{c.name} = {c.value:.4g}, needs {c.op} {c.threshold:.4g}" for c in failed)
    verdict.blessed = not failed
    return verdict
