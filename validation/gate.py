"""Snapshot gate: judges a candidate against the production snapshot (paper 5.2, Table 3).

Checks, each recorded with its value and threshold:
    * absolute (every candidate, including the first one, which has no baseline): embeddings finite;
      per-embedding spread across users above ``min_embedding_std`` (no collapsed embedding); NE of every
      task at most ``max_ne``;
    * relative (when a production snapshot exists): per embedding, mean cosine similarity with production
      on the probe users at least ``min_mean_cosine`` and relative L2-norm change at most
      ``max_relative_l2_change``; the same two numbers between what serving hands downstream after this promotion
      and what it hands now, both by the row owner's pooling rule (``sum_platform.embedding_row``, the
      ``serving.pool_unit`` in force; paper 5.2 and Table 3), against ``*_pooled`` thresholds;
      NE of each task on the day's holdout no worse than production's by more than ``max_ne_regression``;
      the candidate's mean L2 norm per embedding is reported beside the shift (``mean_norm``), not checked;
    * weights finite (a NaN anywhere in the candidate is held even if the probe outputs look fine).
A gate with no thresholds configured refuses to bless anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sum_models.shift import POOL_DEPTH, mean_norms, shift_metrics
from sum_platform.config import GateConfig
from sum_platform.embedding_row import PoolUnit, Slots, served_after_promotion


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
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


def verdict_markdown(verdict: dict[str, Any]) -> str:
    """A verdict (``Verdict.to_dict()`` plus ``snapshot_id``) as the markdown an operator reads in the UI."""
    lines = [f"**{verdict['snapshot_id']}: {verdict['verdict'].upper()}**", "",
             "| check | value | threshold | ok |", "|---|---|---|---|"]
    for c in verdict["checks"]:
        value = "-" if c["value"] is None else format(c["value"], ".4g")
        lines.append(f"| {c['name']} | {value} | {c['op']} {c['threshold']:.4g} | {'yes' if c['passed'] else 'NO'} |")
    return "\n".join(lines + [""] + [f"- {r}" for r in verdict["reasons"]])


def verdict_summary(verdict: dict[str, Any], ne: dict[str, float]) -> dict[str, Any]:
    """The verdict's headline numbers as flat JSON (the ``sum_user_tower`` asset event's ``extra``, shown
    in the UI): snapshot, verdict, baseline, NE per task, the shift per embedding and its worst values
    (lowest mean cosine, highest relative L2 change); non-finite numbers become None."""

    def num(x: Any) -> float | None:
        return float(x) if x is not None and np.isfinite(x) else None

    shift = [{k: (v if k == "embedding" else num(v)) for k, v in m.items()} for m in verdict.get("shift", [])]
    cosines = [m["mean_cosine"] for m in shift if m.get("mean_cosine") is not None]
    l2 = [m["relative_l2_change"] for m in shift if m.get("relative_l2_change") is not None]
    return {
        "snapshot_id": verdict["snapshot_id"],
        "ds": verdict.get("ds"),
        "verdict": verdict["verdict"],
        "blessed": bool(verdict["blessed"]),
        "baseline_snapshot_id": verdict.get("baseline_snapshot_id"),
        "ne": {task: num(v) for task, v in ne.items()},
        "min_mean_cosine": min(cosines) if cosines else None,
        "max_relative_l2_change": max(l2) if l2 else None,
        "shift": shift,
        "reasons": list(verdict.get("reasons", [])),
    }


def _check(name: str, value: float | None, threshold: float, op: str) -> Check:
    """A threshold check; an undefined or non-finite value fails (and is stored as None, valid JSON)."""
    if value is None or not np.isfinite(value):
        return Check(name, None, float(threshold), op, False)
    ok = value <= threshold if op == "<=" else value >= threshold
    return Check(name, float(value), float(threshold), op, bool(ok))


def served_values(candidate: np.ndarray, production: np.ndarray, history: list[np.ndarray] | None,
                  candidate_id: str | None, production_id: str | None, history_ids: list[str] | None,
                  pool_unit: PoolUnit) -> tuple[np.ndarray, np.ndarray]:
    """What serving hands downstream now and after the candidate's promotion, fp16 ``[N, K, D]`` each, by the row
    owner's rule (:func:`sum_platform.embedding_row.served_after_promotion`): "now" is the probe users' history
    (the older snapshots' versions) once production was promoted into it, "after" is that history (production
    first) once the candidate is. Under ``snapshot`` pooling "now" is the pool of production and the older
    versions; under ``write`` pooling both are the raw latest version (what most impressions get)."""
    older = list(history or [])[: POOL_DEPTH - 1]
    ids = list(history_ids or [])[: len(older)]
    ids += [f"older-{i}" for i in range(len(ids), len(older))]  # no dates: never read as "older than"
    cand_id = candidate_id or "candidate"
    prod_id = production_id or "production"

    def slots(versions: list[np.ndarray], names: list[str]) -> Slots:
        n, k, d = candidate.shape
        out = Slots.empty(n, k, d)
        for s, (v, name) in enumerate(zip(versions, names)):
            out.values[:, s] = np.asarray(v, dtype=np.float16)
            out.ids[:, s] = name
        return out

    now = served_after_promotion(slots(older, ids), production, prod_id, pool_unit)
    after = served_after_promotion(slots([production, *older], [prod_id, *ids]), candidate, cand_id, pool_unit)
    return now, after


def judge(
    candidate: np.ndarray,
    production: np.ndarray | None,
    ne: dict[str, float],
    cfg: GateConfig,
    baseline_snapshot_id: str | None = None,
    *,
    history: list[np.ndarray] | None = None,
    candidate_id: str | None = None,
    history_ids: list[str] | None = None,
    pool_unit: PoolUnit = "snapshot",
    production_ne: dict[str, float] | None = None,
    weights_finite: bool = True,
    unmeasured: dict[str, str] | None = None,
    enforce_shift: bool = True,
    nonfinite_predictions: dict[str, Any] | None = None,
) -> Verdict:
    """Judges a candidate snapshot.

    Args:
        candidate: Candidate embeddings of the probe users, [N, K, D].
        production: Production embeddings of the same users, [N, K, D], or None for the first snapshot.
        ne: Normalized Entropy of the candidate per task on the day's holdout.
        cfg: Gate thresholds from ``params.yaml``.
        baseline_snapshot_id: Id of the production snapshot compared against.
        history: Embeddings of the same users by the snapshots before production, newest first
            (up to ``POOL_DEPTH - 1`` are used for average pooling).
        candidate_id: The candidate's snapshot id (the pooling rule reads snapshot ids; default a placeholder).
        history_ids: The snapshot ids of ``history``, newest first (default: placeholders, all distinct).
        pool_unit: ``serving.pool_unit``: what serving's pool is made of (a version per snapshot or per write).
        production_ne: Production's NE on the same holdout (for the non-regression check).
        weights_finite: Whether every candidate weight is finite.
        unmeasured: Tasks whose NE is undefined on today's holdout -> why (a single label class): their NE
            checks are not made, and the reasons say so. A non-finite NE is not in here: it fails.
        enforce_shift: False during the warm-up (``gate.warmup_promotions``): the shift against production
            is measured and reported (``verdict.shift``, the reasons) but does not hold the candidate.
        nonfinite_predictions: Holdout rows whose candidate predictions are NaN/inf while their inputs (and
            production's predictions) are finite, ``{"count", "users"}``: the candidate's own defect, held.

    Returns:
        The :class:`Verdict`; ``blessed`` only when every check passed.
    """
    verdict = Verdict(blessed=False, baseline_snapshot_id=baseline_snapshot_id if production is not None else None)
    required = ("max_ne", "min_mean_cosine", "max_relative_l2_change", "min_mean_cosine_pooled",
                "max_relative_l2_change_pooled", "max_ne_regression")
    missing = [name for name in required if getattr(cfg, name) is None]
    if missing:
        verdict.reasons.append(f"gate thresholds are not configured ({', '.join('gate.' + m for m in missing)}): "
                               "refusing to bless")
        return verdict
    verdict.checks.append(Check("weights_finite", float(weights_finite), 1.0, ">=", bool(weights_finite)))

    cand = candidate.astype(np.float64)
    finite = bool(np.isfinite(cand).all())
    verdict.checks.append(Check("embeddings_finite", float(finite), 1.0, ">=", finite))
    if finite:
        for k in range(cand.shape[1]):
            spread = float(cand[:, k, :].std(axis=0).mean())
            verdict.checks.append(_check(f"embedding_{k}.std_across_users", spread, cfg.min_embedding_std, ">="))
    else:
        verdict.reasons.append("candidate embeddings are not finite: shift not measured")
    bad = int((nonfinite_predictions or {}).get("count", 0))
    verdict.checks.append(Check("predictions_finite", float(bad == 0), 1.0, ">=", bad == 0))
    if bad:
        verdict.reasons.append(f"{bad} holdout row(s) give the candidate NaN/inf predictions where the inputs and "
                               f"production's predictions are finite (users e.g. {nonfinite_predictions['users']})")
    unmeasured = dict(unmeasured or {})
    for task, why in sorted(unmeasured.items()):
        verdict.reasons.append(f"ne.{task} not measured: {why} on today's holdout")
    ne = {task: value for task, value in ne.items() if task not in unmeasured}
    for task, value in sorted(ne.items()):
        verdict.checks.append(_check(f"ne.{task}", value, cfg.max_ne, "<="))

    if production is not None and finite:
        verdict.shift = shift_metrics(candidate, production)
        # Pooled: what serving hands downstream after this promotion vs what it hands now (paper 5.2).
        now, after = served_values(candidate, production, history, candidate_id, baseline_snapshot_id, history_ids,
                                   pool_unit)
        pooled = shift_metrics(after, now)
        shift_checks: list[Check] = []
        for k, (m, mp) in enumerate(zip(verdict.shift, pooled)):
            m["pooled_mean_cosine"] = mp["mean_cosine"]
            m["pooled_relative_l2_change"] = mp["relative_l2_change"]
            shift_checks.append(_check(f"embedding_{k}.mean_cosine", m["mean_cosine"], cfg.min_mean_cosine, ">="))
            shift_checks.append(
                _check(f"embedding_{k}.relative_l2_change", m["relative_l2_change"], cfg.max_relative_l2_change, "<=")
            )
            shift_checks.append(
                _check(f"embedding_{k}.pooled_mean_cosine", mp["mean_cosine"], cfg.min_mean_cosine_pooled, ">=")
            )
            shift_checks.append(_check(f"embedding_{k}.pooled_relative_l2_change", mp["relative_l2_change"],
                                         cfg.max_relative_l2_change_pooled, "<="))
        if enforce_shift:
            verdict.checks.extend(shift_checks)
        else:
            outside = [c.name for c in shift_checks if not c.passed]
            verdict.reasons.append("warm-up (gate.warmup_promotions): shift measured, not enforced"
                                   + (f"; outside the thresholds: {', '.join(outside)}" if outside else ""))
    if production_ne:
        for task, value in sorted(ne.items()):
            if task in production_ne:
                base = production_ne[task]
                delta = None if value is None or base is None else value - base
                verdict.checks.append(_check(f"ne_regression.{task}", delta, cfg.max_ne_regression, "<="))
    elif production is None:
        verdict.reasons.append("first snapshot: no baseline, absolute checks only")

    # Reported, not checked: the candidate's mean L2 norm per embedding, the scale a downstream model's input sees
    # (an unbounded young tower's norm grows for weeks while its day-to-day relative change looks modest).
    for m, norm in zip(verdict.shift, mean_norms(candidate) if verdict.shift else []):
        m["mean_norm"] = norm

    failed = [c for c in verdict.checks if not c.passed]
    verdict.reasons.extend(
        f"{c.name} = {'undefined' if c.value is None else format(c.value, '.4g')}, needs {c.op} {c.threshold:.4g}"
        for c in failed
    )
    verdict.blessed = not failed
    return verdict
