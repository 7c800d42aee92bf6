"""Snapshot gate: judges a candidate against the production snapshot (paper 5.2, Table 3).

Checks, each recorded with its value, threshold, outcome and the evidence it was measured on:
    * absolute (every candidate, including the first one, which has no baseline): embeddings finite;
      per-embedding spread across users above ``min_embedding_std`` (no collapsed embedding); per-embedding mean
      pairwise cosine across the probe users at most ``max_cosine_across_users`` (no near-identical users: the
      spread check is absolute and misses embeddings that all point one way); NE of every task at most ``max_ne``;
    * relative (when a production snapshot exists): per embedding, mean cosine similarity with production
      on the probe users at least ``min_mean_cosine`` and relative L2-norm change at most
      ``max_relative_l2_change``; the same two numbers between what serving hands downstream after this promotion
      and what it hands now, both by the row owner's pooling rule (``sum_platform.embedding_row``, the
      ``serving.pool_unit`` in force; paper 5.2 and Table 3), against ``*_pooled`` thresholds;
      NE of each task on the day's holdout no worse than production's by more than ``max_ne_regression``;
      the candidate's mean L2 norm per embedding is reported beside the shift (``mean_norm``), not checked;
    * weights finite (a NaN anywhere in the candidate is held even if the probe outputs look fine).

An NE check has three outcomes: pass, fail, or **not measurable** -- the task's holdout held fewer than
``min_label_count`` rows of either label (or one class only), so its NE is mostly sampling noise. A not-measurable
check never passes silently: with no production snapshot (a first promotion) nothing else vouches for the
candidate and ``not_measurable_without_production`` decides (``hold``, the default, or ``bless``); with production,
the candidate is judged by its other checks -- the shift against production when enforced -- and the verdict line
says so. Every line names its threshold and its evidence (holdout rows and positives, or probe users).

The consumer check (``validation.consumers``, run by the DAG's ``check_consumers``) adds one check per downstream
model: what it would lose if the candidate were promoted. ``gate.mode`` (proxies | consumers | both) decides which of
the proxies (NE and shift) and the consumers may hold the candidate; the others are measured and reported.
A gate with no thresholds configured refuses to bless anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

from sum_models.shift import POOL_DEPTH, mean_norms, shift_metrics
from sum_platform.config import GateConfig
from sum_platform.embedding_row import PoolUnit, Slots, served_after_promotion
from validation.consumers import consumer_line, interval_text

#: A check's outcome: its value is within the threshold, beyond it, or too thinly evidenced to judge.
Outcome = Literal["pass", "fail", "not_measurable"]


@dataclass(frozen=True)
class Check:
    """One check of the verdict.

    Attributes:
        evidence: What the value was measured on: ``{"probe_users": n}`` for the embedding checks,
            ``{"holdout_rows": n, "positives": p}`` for the NE checks (empty when the caller did not say).
        why: For a not-measurable check, why (e.g. too few positives on the holdout).
    """

    name: str
    value: float | None
    threshold: float
    op: str  # "<=" or ">="
    passed: bool
    outcome: Outcome
    evidence: dict[str, int] = field(default_factory=dict)
    why: str = ""
    enforced: bool = True  # False: measured and reported, but ``gate.mode`` does not let it hold the candidate

    def line(self) -> str:
        """The check as a verdict line: value, threshold, evidence (and why, when not measurable)."""
        value = "undefined" if self.value is None else format(self.value, ".4g")
        if self.outcome == "not_measurable":
            return (f"{self.name} not measurable: {self.why}" +
                    ("" if self.value is None else f"; its value {value} is not judged against {self.op} "
                     f"{self.threshold:.4g}"))
        evidence = evidence_text(self.evidence)
        return (f"{self.name} = {value}, needs {self.op} {self.threshold:.4g}" + (f" ({evidence})" if evidence else "")
                + ("" if self.enforced else " [reported, not enforced: gate.mode]"))


def evidence_text(evidence: Mapping[str, Any]) -> str:
    """``{"holdout_rows": 85, "positives": 2}`` -> "2 positives in 85 holdout rows" (the negatives named too when
    they are the scarcer label); ``{"probe_users": 512}`` -> "512 probe users"; ``{"holdout_rows": 85}`` -> "85
    holdout rows"; empty (the caller did not give it) -> ""."""
    if "positives" in evidence:
        rows, pos = evidence["holdout_rows"], evidence["positives"]
        scarce_negatives = f" ({rows - pos} negatives)" if rows - pos < pos else ""
        users = f" of {evidence['users']} users" if "users" in evidence else ""
        return f"{pos} positives{scarce_negatives} in {rows} holdout rows{users}"
    if "holdout_rows" in evidence:
        return f"{evidence['holdout_rows']} holdout rows"
    if "probe_users" in evidence:
        return f"{evidence['probe_users']} probe users"
    return ""


@dataclass
class Verdict:
    """The gate's decision and everything that produced it."""

    blessed: bool
    baseline_snapshot_id: str | None
    checks: list[Check] = field(default_factory=list)
    shift: list[dict[str, float]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    consumers: list[dict[str, Any]] = field(default_factory=list)  # validation.consumers.ConsumerEffect rows

    @property
    def label(self) -> str:
        return "blessed" if self.blessed else "held"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.label
        return d


_OUTCOME_CELL = {"pass": "yes", "fail": "NO", "not_measurable": "not measurable"}


def verdict_markdown(verdict: dict[str, Any]) -> str:
    """A verdict (``Verdict.to_dict()`` plus ``snapshot_id``) as the markdown an operator reads in the UI."""
    lines = [f"**{verdict['snapshot_id']}: {verdict['verdict'].upper()}**", "",
             "| check | value | threshold | evidence | ok |", "|---|---|---|---|---|"]
    for c in verdict["checks"]:
        value = "-" if c["value"] is None else format(c["value"], ".4g")
        outcome = c.get("outcome") or ("pass" if c["passed"] else "fail")  # a verdict recorded before outcomes
        cell = _OUTCOME_CELL[outcome] + ("" if c.get("enforced", True) else " (reported)")
        lines.append(f"| {c['name']} | {value} | {c['op']} {c['threshold']:.4g} | "
                     f"{evidence_text(c.get('evidence') or {}) or '-'} | {cell} |")
    consumers = verdict.get("consumers") or []
    if consumers:
        lines += ["", "| consumer | NE now | NE after | change % [95 % CI] | impressions worse | vs no SUM % | "
                  "evidence | outcome |", "|---|---|---|---|---|---|---|---|"]
        for c in consumers:
            ne = c.get("ne") or {}
            lines.append(
                f"| {c['consumer']} | {_num(ne.get('now'))} | {_num(ne.get('after'))} | "
                f"{_num(c.get('change_pct'), '+.2f')} {interval_text(c.get('change_ci'))} | "
                f"{'-' if c.get('worse_share') is None else format(100 * c['worse_share'], '.1f') + ' %'} | "
                f"{_num(c.get('vs_without_pct'), '+.2f')} {interval_text(c.get('vs_without_ci'))} | "
                f"{c['positives']} positives in {c['rows']} impressions of {c['users']} users | "
                f"{_OUTCOME_CELL[c['outcome']]} |")
    return "\n".join(lines + [""] + [f"- {r}" for r in verdict["reasons"]])


def _num(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)



def verdict_summary(verdict: dict[str, Any], ne: dict[str, float]) -> dict[str, Any]:
    """The verdict's headline numbers as flat JSON (the ``sum_user_tower`` asset event's ``extra``, shown
    in the UI): snapshot, verdict, baseline, NE per task, the shift per embedding and its worst values
    (lowest mean cosine, highest relative L2 change), the checks not measurable; non-finite numbers become None."""

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
        "not_measurable": [c["name"] for c in verdict.get("checks", []) if c.get("outcome") == "not_measurable"],
        "shift": shift,
        # What each downstream model would lose (the consumer check): change % after vs now, its interval, outcome.
        "consumers": [{"consumer": c["consumer"], "change_pct": num(c.get("change_pct")),
                       "change_ci": [num(v) for v in c["change_ci"]] if c.get("change_ci") else None,
                       "worse_share": num(c.get("worse_share")), "vs_without_pct": num(c.get("vs_without_pct")),
                       "outcome": c["outcome"]} for c in verdict.get("consumers") or []],
        "reasons": list(verdict.get("reasons", [])),
    }


def _check(name: str, value: float | None, threshold: float, op: str, evidence: Mapping[str, int]) -> Check:
    """A threshold check; an undefined or non-finite value fails (and is stored as None, valid JSON)."""
    if value is None or not np.isfinite(value):
        return Check(name, None, float(threshold), op, False, "fail", dict(evidence))
    ok = bool(value <= threshold if op == "<=" else value >= threshold)
    return Check(name, float(value), float(threshold), op, ok, "pass" if ok else "fail", dict(evidence))


def _flag(name: str, ok: bool, evidence: Mapping[str, int]) -> Check:
    """A yes/no check (e.g. every weight finite): value 1 or 0, needs >= 1."""
    return Check(name, float(ok), 1.0, ">=", bool(ok), "pass" if ok else "fail", dict(evidence))


def _not_measurable(name: str, value: float | None, threshold: float, op: str, evidence: Mapping[str, int],
                    why: str) -> Check:
    finite = value is not None and bool(np.isfinite(value))
    return Check(name, float(value) if finite else None, float(threshold), op, False, "not_measurable",
                 dict(evidence), why)


def mean_cosine_across_users(embedding: np.ndarray) -> float | None:
    """Mean cosine similarity between distinct users' vectors of one embedding, in O(N D).

    With unit vectors ``u_i = e_i / ||e_i||`` (users with a zero vector have no direction and are left out)::

        sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2 = ||sum_i u_i||^2 - N
        mean_{i != j} cos(e_i, e_j) = (||sum_i u_i||^2 - N) / (N (N - 1))

    1 when every user's vector points the same way (a collapsed embedding, whatever its spread in norm), about 0
    for directions spread around the origin.

    Args:
        embedding: One embedding of the probe users, ``[N, D]``.

    Returns:
        The mean pairwise cosine, or None with fewer than two non-zero vectors.
    """
    x = np.asarray(embedding, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    units = x[norms > 0] / norms[norms > 0, None]
    n = len(units)
    if n < 2:
        return None
    total = units.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def _ne_measurability(task: str, evidence: Mapping[str, Mapping[str, int]] | None, unmeasured: Mapping[str, str],
                      min_label_count: int) -> tuple[dict[str, int], str | None]:
    """The NE evidence of ``task`` and, when its NE is not measurable, why."""
    ev = {k: int(v) for k, v in ((evidence or {}).get(task) or {}).items() if k in ("holdout_rows", "positives")}
    if len(ev) < 2:
        ev = {}
    needs = f"needs >= {min_label_count} of each label (gate.min_label_count)"
    if task in unmeasured:
        return ev, f"{unmeasured[task]} on today's holdout" + (f" ({evidence_text(ev)})" if ev else "") + f", {needs}"
    if ev and min(ev["positives"], ev["holdout_rows"] - ev["positives"]) < min_label_count:
        return ev, f"{evidence_text(ev)}, {needs}"
    return ev, None


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
    ne_evidence: Mapping[str, Mapping[str, int]] | None = None,
    enforce_shift: bool = True,
    nonfinite_predictions: dict[str, Any] | None = None,
    consumers: list[dict[str, Any]] | None = None,
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
            checks are not measurable, and the reasons say so. A non-finite NE is not in here: it fails.
        ne_evidence: Per task, what its NE (and production's) was measured on: ``{"holdout_rows": n,
            "positives": p}`` (the scored holdout rows). A task with fewer than ``gate.min_label_count`` rows of
            either label has its NE checks not measurable. None: sizes unknown (e.g. a replay that did not count
            them); the NE checks are judged as they stand, and the reasons say so.
        enforce_shift: False during the warm-up (``gate.warmup_promotions``): the shift against production
            is measured and reported (``verdict.shift``, the reasons) but does not hold the candidate.
        nonfinite_predictions: Holdout rows whose candidate predictions are NaN/inf while their inputs (and
            production's predictions) are finite, ``{"count", "users"}``: the candidate's own defect, held.
        consumers: The consumer check's rows (:class:`validation.consumers.ConsumerEffect` as dicts), one per
            saved downstream model; empty: no consumer yet (said in the reasons); None: no consumer check was run
            (a replay of the proxies, e.g. the study's chain). ``gate.mode`` decides what holds: ``proxies``
            (NE and shift checks; the consumers reported), ``consumers`` (the consumers; NE and shift reported,
            and enforced only while no consumer is measurable), ``both``. Finite and collapse checks always hold.

    Returns:
        The :class:`Verdict`; ``blessed`` when no check failed and no not-measurable check holds it (only with
        no production and ``gate.not_measurable_without_production: hold``).
    """
    verdict = Verdict(blessed=False, baseline_snapshot_id=baseline_snapshot_id if production is not None else None)
    required = ("max_ne", "min_mean_cosine", "max_relative_l2_change", "min_mean_cosine_pooled",
                "max_relative_l2_change_pooled", "max_ne_regression")
    missing = [name for name in required if getattr(cfg, name) is None]
    if missing:
        verdict.reasons.append(f"gate thresholds are not configured ({', '.join('gate.' + m for m in missing)}): "
                               "refusing to bless")
        return verdict
    n_probe = int(candidate.shape[0])
    probe = {"probe_users": n_probe}
    verdict.checks.append(_flag("weights_finite", weights_finite, {}))

    cand = candidate.astype(np.float64)
    finite = bool(np.isfinite(cand).all())
    verdict.checks.append(_flag("embeddings_finite", finite, probe))
    if finite:
        for k in range(cand.shape[1]):
            spread = float(cand[:, k, :].std(axis=0).mean())
            verdict.checks.append(_check(f"embedding_{k}.std_across_users", spread, cfg.min_embedding_std, ">=",
                                         probe))
            # Relative collapse: every user pointing one way passes an absolute spread when the norms are large.
            verdict.checks.append(_check(f"embedding_{k}.cosine_across_users", mean_cosine_across_users(cand[:, k]),
                                         cfg.max_cosine_across_users, "<=", probe))
    else:
        verdict.reasons.append("candidate embeddings are not finite: shift not measured")
    bad = int((nonfinite_predictions or {}).get("count", 0))
    scored_rows = max((int(e.get("holdout_rows", 0)) for e in (ne_evidence or {}).values()), default=None)
    verdict.checks.append(_flag("predictions_finite", bad == 0, {} if scored_rows is None else
                                {"holdout_rows": scored_rows}))
    if bad:
        verdict.reasons.append(f"{bad} holdout row(s) give the candidate NaN/inf predictions where the inputs and "
                               f"production's predictions are finite (users e.g. {nonfinite_predictions['users']})")

    # NE per task: measurable only on enough rows of each label; the regression check on the same rows.
    unmeasured = dict(unmeasured or {})
    if ne_evidence is None:
        verdict.reasons.append("NE evidence sizes not given: the NE checks are judged without gate.min_label_count")
    ne_checks: list[tuple[str, float | None, float, Mapping[str, int], str | None]] = []
    for task in sorted(set(ne) | set(unmeasured)):
        evidence, why = _ne_measurability(task, ne_evidence, unmeasured, cfg.min_label_count)
        value = ne.get(task)
        if task not in unmeasured and (value is None or not np.isfinite(value)):
            why = None  # no NE where one was measurable: the candidate's defect, not the holdout's size (fails)
        ne_checks.append((f"ne.{task}", value, cfg.max_ne, evidence, why))
        if production_ne and task in production_ne:
            base = production_ne[task]
            delta = None if value is None or base is None else value - base
            ne_checks.append((f"ne_regression.{task}", delta, cfg.max_ne_regression, evidence, why))
    for name, value, threshold, evidence, why in ne_checks:
        verdict.checks.append(_check(name, value, threshold, "<=", evidence) if why is None
                              else _not_measurable(name, value, threshold, "<=", evidence, why))

    enforced = production is not None and finite and enforce_shift
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
            shift_checks.append(_check(f"embedding_{k}.mean_cosine", m["mean_cosine"], cfg.min_mean_cosine, ">=",
                                       probe))
            shift_checks.append(_check(f"embedding_{k}.relative_l2_change", m["relative_l2_change"],
                                       cfg.max_relative_l2_change, "<=", probe))
            shift_checks.append(_check(f"embedding_{k}.pooled_mean_cosine", mp["mean_cosine"],
                                       cfg.min_mean_cosine_pooled, ">=", probe))
            shift_checks.append(_check(f"embedding_{k}.pooled_relative_l2_change", mp["relative_l2_change"],
                                       cfg.max_relative_l2_change_pooled, "<=", probe))
        if enforce_shift:
            verdict.checks.extend(shift_checks)
        else:
            outside = [c.line() for c in shift_checks if not c.passed]
            verdict.reasons.append(f"warm-up (gate.warmup_promotions): shift measured on {n_probe} probe users, not "
                                   "enforced" + (f"; outside the thresholds: {'; '.join(outside)}" if outside else ""))
    if production is None:
        verdict.reasons.append("first snapshot: no baseline, absolute checks only")

    # Reported, not checked: the candidate's mean L2 norm per embedding, the scale a downstream model's input sees
    # (an unbounded young tower's norm grows for weeks while its day-to-day relative change looks modest).
    for m, norm in zip(verdict.shift, mean_norms(candidate) if verdict.shift else []):
        m["mean_norm"] = norm

    # A not-measurable check vouches for nothing. With production, the candidate is still compared with a snapshot
    # that was blessed (the shift checks, when enforced); with none, nothing else vouches for it: the policy decides.
    _apply_mode(verdict, cfg, consumers, production is not None)

    unmeasurable = [c for c in verdict.checks if c.outcome == "not_measurable" and c.enforced]
    policy = cfg.not_measurable_without_production
    if production is None:
        then = (f"no production to compare with, so nothing else vouches for this first promotion: "
                f"{'held' if policy == 'hold' else 'not held'} (gate.not_measurable_without_production: {policy})")
    elif not finite:
        then = "the shift against production is not measured (embeddings not finite)"
    elif enforced:
        then = f"the shift checks against {baseline_snapshot_id} on {n_probe} probe users and the other checks decide"
    else:
        then = "the shift against production is not enforced (warm-up) either: the other checks decide"
    verdict.reasons.extend(f"{c.line()}; {then}" for c in unmeasurable)
    failed = [c for c in verdict.checks if c.outcome == "fail" and c.enforced]
    verdict.reasons.extend(c.line() for c in failed)
    verdict.reasons.extend(c.line() for c in verdict.checks if c.outcome == "fail" and not c.enforced)
    held_unmeasured = bool(unmeasurable) and production is None and policy == "hold"
    verdict.blessed = not failed and not held_unmeasured
    return verdict


#: Checks that stand in for the consumers (``gate.mode``): the candidate's own NE and its shift against production.
_PROXY_PREFIXES = ("ne.", "ne_regression.")
_PROXY_SUFFIXES = (".mean_cosine", ".relative_l2_change", ".pooled_mean_cosine", ".pooled_relative_l2_change")


def _is_proxy(check: Check) -> bool:
    return check_family(check.name) == "proxies"


#: The families of checks (``check_family``): what always holds, what stands in for the consumers, the consumers.
CHECK_FAMILIES = ("sanity", "proxies", "consumers")


def check_family(name: str) -> str:
    """The family of a verdict check by its name: ``consumers`` (``consumer.<model>.ne_change_pct``), ``proxies``
    (the candidate's NE and its shift against production, unpooled and pooled) or ``sanity`` (finite weights,
    embeddings and predictions; the collapse checks ``*_across_users``: they hold in every ``gate.mode``)."""
    if name.startswith("consumer."):
        return "consumers"
    if name.startswith(_PROXY_PREFIXES) or (name.endswith(_PROXY_SUFFIXES) and not name.endswith("across_users")):
        return "proxies"
    return "sanity"


def _apply_mode(verdict: Verdict, cfg: GateConfig, consumers: list[dict[str, Any]] | None,
                has_production: bool) -> None:
    """Adds the consumer checks and marks what ``gate.mode`` does not let hold the candidate (reported only)."""
    from dataclasses import replace

    rows = list(consumers or [])
    verdict.consumers = rows
    measured = [c for c in rows if c["outcome"] != "not_measurable"]
    for c in rows:
        verdict.checks.append(Check(
            f"consumer.{c['consumer']}.ne_change_pct", c.get("change_pct"), float(c["threshold_pct"]), "<=",
            c["outcome"] == "pass", c["outcome"],
            {"holdout_rows": int(c["rows"]), "positives": int(c["positives"]), "users": int(c["users"])},
            c.get("why", ""), enforced=cfg.mode != "proxies"))
        verdict.reasons.append(consumer_line(c))
    proxies_enforced = cfg.mode != "consumers" or not measured
    if cfg.mode != "proxies" and not measured and consumers is not None:  # None: the caller ran no consumer check
        verdict.reasons.append(
            ("no consumer yet (no downstream model saved before this day)" if not rows else
             "no consumer measurable on today's consumer holdout") + (": the proxies decide" if has_production else
                                                                    "") + f" (gate.mode: {cfg.mode})")
    if not proxies_enforced:
        verdict.checks[:] = [replace(c, enforced=False) if _is_proxy(c) else c for c in verdict.checks]
