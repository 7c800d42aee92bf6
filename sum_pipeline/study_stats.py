"""The study's statistics: paired per-seed contrasts, their intervals, and each direction's verdict read from them.

``sumctl study`` measures every arm on every seed (``sum_pipeline/study.py``); this module turns those
measurements into the paper's Tables 1-4 and says, for each of the paper's directions, whether it holds here.

**Paired contrasts.** Every comparison is made within a seed, where both arms saw the same simulated world,
the same upstream snapshots and the same downstream initialisation::

    % NE diff (seed, model) = 100 * (NE_arm - NE_ref) / NE_ref

Where the paper's row is one model (Tables 2 and 4, the between-mode contrasts) the per-seed value is the
mean over our downstream models; Table 1 keeps one row per model. Over seeds: the mean, a Student-t interval
(``df = seeds - 1``) and, as a cross-check, a percentile bootstrap over seeds (fixed generator seed).

**Verdicts come from intervals only.** A direction *holds* when its whole interval lies on the paper's side,
*does not hold* when it lies wholly on the other side, is *undetermined* when it straddles, and is *not
measurable* with fewer than two seeds. A point estimate never decides.

What :func:`tables` reads from ``results`` (the study writes it; absent keys mean "not measured")::

    measurements  [{"seed", "model", "arm", "pool_unit", "window", "subset", "ne", "n"} (+ optional "coverage":
                  the share of the arm's impressions served an embedding)]
                  arm: none | frozen | offline | offline_raw | async | realtime; pool_unit: snapshot | write
                  for async and realtime, None otherwise; window: eval | early (the days before the eval window,
                  each scored before training on it); subset: all | covered (impressions every arm serves an
                  embedding, so the reference is the "none" arm on the same impressions) | returning
    fi_rank       [{"seed", "model", "rank", "n_features"}]   the SUM embeddings' permutation-importance rank
    shift         [{"seed", "embedding", "pooling", "cosine", "l2_change"} (+ optional "part": total |
                  snapshot | features)]
    choices       {...}: printed by the report; ``staleness`` ({mode: text}) and ``downstream_features``
                  ({model: text}) are also shown in Table 2 and the caveat on magnitudes, ``serving_pool_unit``
                  picks Table 1's pool unit, ``workers`` goes on the runtime line.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sum_models.shift import POOL_DEPTH
from sum_platform.embedding_row import POOL_UNITS

__all__ = [
    "CONFIDENCE", "HOLDS", "DOES_NOT_HOLD", "UNDETERMINED", "NOT_MEASURABLE", "VERDICTS", "t_value", "t_interval",
    "bootstrap_interval", "summarize", "verdict", "all_of", "ratio_interval", "tables",
]

CONFIDENCE = 0.95
#: Percentile bootstrap over seeds: resamples and a fixed generator seed (the same results give the same bytes).
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 20260101

HOLDS, DOES_NOT_HOLD, UNDETERMINED, NOT_MEASURABLE = "holds", "does not hold", "undetermined", "not measurable"
VERDICTS = (HOLDS, DOES_NOT_HOLD, UNDETERMINED, NOT_MEASURABLE)

#: Arms, Table 2's modes in the paper's row order, and the arm Table 1 reports (production serves async).
BASELINE = "none"
TABLE2_MODES = ("frozen", "offline", "realtime", "async")
TABLE1_ARM = "async"
#: Table 1 is reported under serving's pool unit (``choices["serving_pool_unit"]``, by default ``serving.pool_unit``'s
#: default); Table 2 under both.
TABLE1_POOL_UNIT = "snapshot"
SUBSETS = ("all", "covered", "returning")
WINDOWS = ("eval", "early")
#: The CTR models whose FI rank the paper's "top features" claim is about, and the paper's top ranks (1-4).
CTR_MODELS = ("click", "inbox")
TOP_RANK = 4
#: "async keeps most of realtime's gain": most read literally, a majority of it (the paper measured 89 %).
MOST = 0.5

#: The between-arm contrasts the audit lists (arm, reference): each a paired % NE diff, per pool unit.
BETWEEN_ARMS = (("offline", "offline_raw"), ("async", "offline"), ("realtime", "async"), ("async", "frozen"),
                ("offline", "frozen"), ("async_gated", "async"))
#: Async served only by the snapshots the consumer check passes (``study.consumer_gated_arm``).
GATED_ARM = "async_gated"


# ------------------------------------------------------------------------------------------- intervals

def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean(values: Iterable[float | None]) -> float | None:
    vals = _finite(values)
    return float(np.mean(vals)) if vals else None


def t_value(n: int, confidence: float = CONFIDENCE) -> float:
    """Student-t quantile of a two-sided ``confidence`` interval of the mean of ``n`` values (df = n - 1)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def t_interval(values: Iterable[float | None], confidence: float = CONFIDENCE, lower: float = -math.inf,
               upper: float = math.inf) -> list[float] | None:
    """Student-t interval of the mean (None for fewer than two values), clipped to ``[lower, upper]``, the
    values' possible range (a rank's interval never starts below 1)."""
    vals = _finite(values)
    if len(vals) < 2:
        return None
    mean, sem = float(np.mean(vals)), float(np.std(vals, ddof=1) / math.sqrt(len(vals)))
    half = t_value(len(vals), confidence) * sem
    return [max(mean - half, lower), min(mean + half, upper)]


def bootstrap_interval(values: Iterable[float | None], confidence: float = CONFIDENCE) -> list[float] | None:
    """Percentile bootstrap interval of the mean over seeds (None for fewer than two values)."""
    from scipy import stats

    vals = _finite(values)
    if len(vals) < 2:
        return None
    res = stats.bootstrap((np.asarray(vals),), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                          confidence_level=confidence, rng=np.random.default_rng(BOOTSTRAP_SEED))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def summarize(per_seed: Mapping[int, float | None], lower: float = -math.inf,
              upper: float = math.inf) -> dict[str, Any]:
    """``{"mean", "ci", "bootstrap_ci", "n_seeds", "n_below_zero", "per_seed": [{"seed", "value"}]}`` of per-seed
    values (``n_below_zero``: how consistent the sign is, which the interval of a heavy-tailed mean can hide)."""
    vals = _finite(per_seed.values())
    return {"mean": float(np.mean(vals)) if vals else None,
            "ci": t_interval(vals, lower=lower, upper=upper),
            "bootstrap_ci": bootstrap_interval(vals),
            "n_seeds": len(vals),
            "n_below_zero": sum(v < 0 for v in vals),
            "per_seed": [{"seed": s, "value": per_seed[s]} for s in sorted(per_seed)]}


def verdict(ci: Sequence[float] | None, claimed: str, threshold: float = 0.0) -> str:
    """The direction's verdict from its interval alone.

    Args:
        ci: ``[lo, hi]``; None when there are fewer than two seeds.
        claimed: ``"below"`` (the paper says the quantity is under ``threshold``, e.g. an NE diff < 0) or
            ``"above"``.
        threshold: The boundary of the claim.
    """
    if claimed not in ("below", "above"):
        raise ValueError(f"claimed must be 'below' or 'above', got {claimed!r}")
    if not ci or any(c is None or not math.isfinite(c) for c in ci):
        return NOT_MEASURABLE
    lo, hi = ci
    if claimed == "below":
        return HOLDS if hi < threshold else DOES_NOT_HOLD if lo > threshold else UNDETERMINED
    return HOLDS if lo > threshold else DOES_NOT_HOLD if hi < threshold else UNDETERMINED


def all_of(verdicts: Sequence[str]) -> str:
    """The verdict on "every part holds": one part wholly against it is enough to refute it."""
    if not verdicts or all(v == NOT_MEASURABLE for v in verdicts):
        return NOT_MEASURABLE
    if DOES_NOT_HOLD in verdicts:
        return DOES_NOT_HOLD
    return HOLDS if all(v == HOLDS for v in verdicts) else UNDETERMINED


def ratio_interval(num: Sequence[float], den: Sequence[float],
                   confidence: float = CONFIDENCE) -> tuple[float | None, list[float] | None]:
    """``mean(num) / mean(den)`` of paired per-seed values with Fieller's interval.

    Fieller's interval is the set of ratios ``q`` that the paired t interval of ``num - q * den`` contains zero
    for, so a verdict read from it agrees with the linear contrast's; it is None (unbounded) when the
    denominator's own interval contains zero: a share of a gain that may be nothing is not measured.
    """
    pairs = [(float(a), float(b)) for a, b in zip(num, den) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    if not pairs:
        return None, None
    a, b = np.asarray(pairs).T
    ratio = float(a.mean() / b.mean()) if b.mean() != 0 else None
    n = len(a)
    if n < 2:
        return ratio, None
    g = t_value(n, confidence) ** 2 / n
    cov = np.cov(a, b, ddof=1)
    # (a_mean - q b_mean)^2 <= g * var(a - q b):  A q^2 - 2 B q + C <= 0
    big_a = b.mean() ** 2 - g * cov[1, 1]
    big_b = a.mean() * b.mean() - g * cov[0, 1]
    big_c = a.mean() ** 2 - g * cov[0, 0]
    if big_a <= 0:
        return ratio, None
    root = math.sqrt(max(big_b ** 2 - big_a * big_c, 0.0))
    return ratio, [float((big_b - root) / big_a), float((big_b + root) / big_a)]


def _ratio_of_means(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample whose denominator is 0: inf, then no interval
        return np.mean(x, axis=axis) / np.mean(y, axis=axis)


def _ratio_bootstrap(num: Sequence[float], den: Sequence[float], confidence: float = CONFIDENCE) -> list[float] | None:
    """Percentile bootstrap over seeds (pairs resampled together) of ``mean(num) / mean(den)``: a cross-check."""
    from scipy import stats

    if len(num) < 2:
        return None
    with np.errstate(invalid="ignore"):
        res = stats.bootstrap((np.asarray(num, float), np.asarray(den, float)), _ratio_of_means, paired=True,
                              vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                              confidence_level=confidence, rng=np.random.default_rng(BOOTSTRAP_SEED))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return [lo, hi] if math.isfinite(lo) and math.isfinite(hi) else None


# ------------------------------------------------------------------------------------------ measurements

Key = tuple[str, Any, str, str, str, int]  # (arm, pool_unit, window, subset, model, seed)


class Measured:
    """The study's measurements, indexed: NE (and coverage) per arm, pool unit, window, subset, model, seed."""

    def __init__(self, records: Iterable[Mapping[str, Any]]):
        self.ne: dict[Key, float | None] = {}
        self.coverage: dict[Key, float] = {}
        self.n: dict[Key, int] = {}
        models: list[str] = []
        for r in records:
            key = (r["arm"], r.get("pool_unit"), r.get("window", "eval"), r.get("subset", "all"), r["model"],
                   int(r["seed"]))
            if key in self.ne:
                raise ValueError(f"two measurements of {key}")
            ne = r.get("ne")
            self.ne[key] = float(ne) if ne is not None and math.isfinite(ne) else None
            if r.get("coverage") is not None:
                self.coverage[key] = float(r["coverage"])
            if r.get("n") is not None:
                self.n[key] = int(r["n"])
            if r["model"] not in models:
                models.append(r["model"])
        self.models = models  # in the study's order
        self.seeds = sorted({k[5] for k in self.ne})
        self.subsets = [s for s in SUBSETS if any(k[3] == s for k in self.ne)]
        self.windows = [w for w in WINDOWS if any(k[2] == w for k in self.ne)]
        found: dict[str, set] = {}
        for k in self.ne:
            found.setdefault(k[0], set()).add(k[1])
        self._units = {arm: [u for u in POOL_UNITS if u in us] + sorted(u for u in us if u not in POOL_UNITS and u)
                       or ([None] if None in us else []) for arm, us in found.items()}

    def units(self, arm: str) -> list[Any]:
        """The pool units ``arm`` was served under (``[None]`` for an arm that does not pool per request; ``[]``
        for an arm not measured)."""
        return self._units.get(arm, [])

    def unit_of(self, arm: str, unit: Any) -> Any:
        """The reference's pool unit in a contrast with an arm served under ``unit``: the same one when the
        reference pools per request, None when it does not (frozen, offline batch, no SUM)."""
        return unit if unit in self.units(arm) else None

    def get(self, arm: str, unit: Any, window: str, subset: str, model: str, seed: int) -> float | None:
        return self.ne.get((arm, self.unit_of(arm, unit), window, subset, model, seed))

    def pct(self, arm: str, ref: str, unit: Any, window: str, subset: str, model: str, seed: int) -> float | None:
        """``100 * (NE_arm - NE_ref) / NE_ref`` in one seed and model (None if either is missing)."""
        a, r = self.get(arm, unit, window, subset, model, seed), self.get(ref, unit, window, subset, model, seed)
        return None if a is None or r is None or r == 0 else 100.0 * (a - r) / r

    def per_seed(self, arm: str, ref: str, unit: Any, window: str, subset: str,
                 models: Sequence[str]) -> dict[int, float | None]:
        """Per seed, the mean over ``models`` of the paired % NE diff (a model missing in a seed is left out)."""
        return {s: _mean(self.pct(arm, ref, unit, window, subset, m, s) for m in models) for s in self.seeds}

    def mean_of(self, table: Mapping[Key, float | None], arm: str, unit: Any, window: str, subset: str,
                models: Sequence[str]) -> float | None:
        """The mean of ``table``'s entries (NE, coverage, impressions) for ``arm`` over models and seeds."""
        return _mean(table.get((arm, self.unit_of(arm, unit), window, subset, m, s))
                     for m in models for s in self.seeds)

    def pair_units(self, arm: str, ref: str) -> list[Any]:
        """The pool units a contrast of ``arm`` with ``ref`` is made under ([None]: neither pools per request)."""
        named = [u for u in self.units(arm) + self.units(ref) if u is not None]
        return list(dict.fromkeys(named)) or [None]


def _contrast(m: Measured, arm: str, ref: str, unit: Any, window: str, subset: str, models: Sequence[str],
              claimed: str | None = "below") -> dict[str, Any]:
    stats = summarize(m.per_seed(arm, ref, unit, window, subset, models))
    pooled = unit in m.units(arm) or unit in m.units(ref)
    return {"arm": arm, "ref": ref, "pool_unit": unit if pooled else None,
            "window": window, "subset": subset, "models": list(models), "claimed": claimed, **stats,
            "verdict": verdict(stats["ci"], claimed) if claimed else None}


# ------------------------------------------------------------------------------------------------ tables

def _table1(m: Measured, fi_rank: Sequence[Mapping[str, Any]], choices: Mapping[str, Any]) -> list[dict[str, Any]]:
    units = m.units(TABLE1_ARM)
    wanted = choices.get("serving_pool_unit") or TABLE1_POOL_UNIT  # what serving is configured to pool
    unit = wanted if wanted in units else (units[0] if units else None)
    ranks: dict[str, dict[int, float]] = {}
    n_features: dict[str, int] = {}
    for r in fi_rank:
        if r.get("rank") is not None:
            ranks.setdefault(r["model"], {})[int(r["seed"])] = float(r["rank"])
        if r.get("n_features") is not None:
            n_features[r["model"]] = max(n_features.get(r["model"], 0), int(r["n_features"]))
    rows = []
    for subset in m.subsets:
        for model in m.models:
            c = _contrast(m, TABLE1_ARM, BASELINE, unit, "eval", subset, [model])
            row = {"model": model, "subset": subset, "pool_unit": unit,
                   "ne_without": m.mean_of(m.ne, BASELINE, None, "eval", subset, [model]),
                   "ne_with": m.mean_of(m.ne, TABLE1_ARM, unit, "eval", subset, [model]),
                   "impressions": m.mean_of(m.n, TABLE1_ARM, unit, "eval", subset, [model]),
                   "ne_diff": c, "verdict": c["verdict"],
                   "per_seed": [{"seed": s, "ne_without": m.get(BASELINE, None, "eval", subset, model, s),
                                 "ne_with": m.get(TABLE1_ARM, unit, "eval", subset, model, s),
                                 "ne_diff_pct": m.pct(TABLE1_ARM, BASELINE, unit, "eval", subset, model, s),
                                 "fi_rank": ranks.get(model, {}).get(s) if subset == "all" else None}
                                for s in m.seeds]}
            if subset == "all" and model in ranks:
                nf = n_features.get(model)
                row["fi_rank"] = summarize(ranks[model], lower=1, upper=nf if nf else math.inf)
                row["n_features"] = nf
            rows.append(row)
    return rows


def _table2(m: Measured, choices: Mapping[str, Any]) -> list[dict[str, Any]]:
    staleness = choices.get("staleness") or {}
    rows = []
    for subset in m.subsets:
        for mode in TABLE2_MODES:
            for unit in m.units(mode):
                c = _contrast(m, mode, BASELINE, unit, "eval", subset, m.models)
                per_model = {model: _mean(m.per_seed(mode, BASELINE, unit, "eval", subset, [model]).values())
                             for model in m.models}
                rows.append({"mode": mode, "pool_unit": unit, "subset": subset, "staleness": staleness.get(mode),
                             "ne_diff": c, "verdict": c["verdict"], "per_model": per_model,
                             "coverage": m.mean_of(m.coverage, mode, unit, "eval", subset, m.models)})
    return rows


def _between_arms(m: Measured) -> list[dict[str, Any]]:
    out = []
    for subset in m.subsets:
        for arm, ref in BETWEEN_ARMS:
            if not m.units(arm) or not m.units(ref):
                continue
            for unit in m.pair_units(arm, ref):
                # an arm measured under some pool units only (the consumer-gated one: serving's) has no pair under
                # the others
                if any(m.units(a) != [None] and unit not in m.units(a) for a in (arm, ref)):
                    continue
                out.append({"table": 2, **_contrast(m, arm, ref, unit, "eval", subset, m.models)})
    return out


def _table4(m: Measured) -> list[dict[str, Any]]:
    rows = []
    for subset in m.subsets:
        for setting, arm, ref in (("no_ap", "offline_raw", BASELINE), (f"ap{POOL_DEPTH}", "offline", BASELINE),
                                  ("ap_effect", "offline", "offline_raw")):
            if not m.units(arm) or not m.units(ref):
                continue
            row = {"setting": setting, "arm": arm, "ref": ref, "subset": subset}
            for window in WINDOWS:
                row[f"{window}_ne_diff"] = (_contrast(m, arm, ref, None, window, subset, m.models)
                                            if window in m.windows else None)
            rows.append(row)
    return rows


def _table3(shift: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per (embedding, pooling depth, part), and per embedding the paired (depth POOL_DEPTH - depth 1)
    differences of cosine and L2 change."""
    per: dict[tuple[int, int, str], dict[str, dict[int, list[float]]]] = {}
    for r in shift:
        key = (int(r["embedding"]), int(r["pooling"]), r.get("part") or "total")
        for q in ("cosine", "l2_change"):
            if r.get(q) is not None:
                per.setdefault(key, {"cosine": {}, "l2_change": {}})[q].setdefault(int(r["seed"]), []).append(
                    float(r[q]))
    seed_means = {key: {q: {s: float(np.mean(v)) for s, v in by_seed.items()} for q, by_seed in qs.items()}
                  for key, qs in per.items()}
    rows = [{"embedding": e, "pooling": k, "part": part, "cosine": summarize(qs["cosine"]),
             "l2_change": summarize(qs["l2_change"])}
            for (e, k, part), qs in sorted(seed_means.items(), key=lambda kv: (kv[0][2] != "total", kv[0]))]
    diffs = []
    for e in sorted({key[0] for key in seed_means}):
        raw, ap = seed_means.get((e, 1, "total")), seed_means.get((e, POOL_DEPTH, "total"))
        if raw is None or ap is None:
            continue
        entry: dict[str, Any] = {"embedding": e, "pooling": [1, POOL_DEPTH]}
        for q, claimed in (("cosine", "above"), ("l2_change", "below")):
            seeds = sorted(set(raw[q]) & set(ap[q]))
            stats = summarize({s: ap[q][s] - raw[q][s] for s in seeds})
            entry[q] = {**stats, "claimed": claimed, "verdict": verdict(stats["ci"], claimed)}
        diffs.append(entry)
    return rows, diffs


def _share_kept(m: Measured) -> list[dict[str, Any]]:
    """Per pool unit: the share of realtime's NE gain (vs no SUM) that async keeps, with Fieller's interval."""
    out = []
    for unit in m.units("async"):
        if unit not in m.units("realtime"):
            continue
        a = m.per_seed("async", BASELINE, unit, "eval", "all", m.models)
        r = m.per_seed("realtime", BASELINE, unit, "eval", "all", m.models)
        seeds = [s for s in m.seeds if a.get(s) is not None and r.get(s) is not None]
        num, den = [a[s] for s in seeds], [r[s] for s in seeds]
        share, ci = ratio_interval(num, den)
        gain = t_interval(den)
        # A share of a gain needs the gain: realtime's own NE diff wholly below zero, else nothing is kept or lost.
        gained = gain is not None and gain[1] < 0
        v = (NOT_MEASURABLE if len(seeds) < 2 else UNDETERMINED if ci is None or not gained
             else verdict(ci, "above", MOST))
        out.append({"pool_unit": unit, "share": share, "ci": ci, "bootstrap_ci": _ratio_bootstrap(num, den),
                    "realtime_gain_ci": gain, "n_seeds": len(seeds), "threshold": MOST, "verdict": v,
                    "per_seed": [{"seed": s, "async": a[s], "realtime": r[s]} for s in seeds]})
    return out


# ---------------------------------------------------------------------------------------------- directions

def _fmt(v: float | None, digits: int = 3, sign: str = "+") -> str:
    return "n/a" if v is None else f"{v:{sign}.{digits}f}"


def _fmt_ci(ci: Sequence[float] | None, digits: int = 3, sign: str = "+") -> str:
    return "no interval" if not ci else f"[{ci[0]:{sign}.{digits}f}, {ci[1]:{sign}.{digits}f}]"


def _said(c: Mapping[str, Any], digits: int = 3, sign: str = "+") -> str:
    """``-1.250 [-1.360, -1.130] (n=10)``: a summary over seeds, in the directions' evidence."""
    return f"{_fmt(c.get('mean'), digits, sign)} {_fmt_ci(c.get('ci'), digits, sign)} (n={c.get('n_seeds', 0)})"


def _direction(claim: str, table: str, v: str, evidence: str, pool_unit: Any = None) -> dict[str, Any]:
    # "holds" stays a tri-state for older readers (the CLI): True, False, or None (undetermined / not measurable).
    return {"claim": claim, "table": table, "pool_unit": pool_unit, "verdict": v,
            "holds": {HOLDS: True, DOES_NOT_HOLD: False}.get(v), "evidence": evidence}


def _directions(t1, t2_contrasts, shares, t3_diffs, t4) -> list[dict[str, Any]]:
    out = []
    rows = [r for r in t1 if r["subset"] == "all"]
    out.append(_direction(
        "SUM embeddings lower every downstream model's NE (Table 1: async vs no SUM, each model's interval below 0)",
        "1", all_of([r["verdict"] for r in rows]) if rows else NOT_MEASURABLE,
        "; ".join(f"{r['model']} {_said(r['ne_diff'])} % → {r['verdict']}" for r in rows)))
    ctr = [r for r in rows if r["model"] in CTR_MODELS and r.get("fi_rank")]
    fi_verdicts = [verdict(r["fi_rank"]["ci"], "below", TOP_RANK + 0.5) for r in ctr]
    out.append(_direction(
        f"the SUM embeddings rank among the top {TOP_RANK} features of the CTR models (paper: rank 1-4 in 6 of 8; "
        f"interval of the rank within 1..{TOP_RANK})", "1", all_of(fi_verdicts) if ctr else NOT_MEASURABLE,
        "; ".join(f"{r['model']}: rank {_said(r['fi_rank'], 1, '')} of {r.get('n_features')} → {v}"
                  for r, v in zip(ctr, fi_verdicts))))
    by = {(c["arm"], c["ref"], c["pool_unit"]): c for c in t2_contrasts if c["subset"] == "all"}
    for unit in sorted({c["pool_unit"] for c in t2_contrasts if c["pool_unit"]}, key=str):
        links = [by.get(("offline", "frozen", None)), by.get(("async", "offline", unit))]
        links = [c for c in links if c]
        out.append(_direction(
            f"serving modes order frozen < offline batch < async in NE gain (Table 2, pool unit {unit}; each link "
            f"a paired contrast below 0)", "2", all_of([c["verdict"] for c in links]) if len(links) == 2
            else NOT_MEASURABLE,
            "; ".join(f"{c['arm']} vs {c['ref']} {_said(c)} % → {c['verdict']}" for c in links), unit))
    for s in shares:
        out.append(_direction(
            f"async keeps most (> {100 * MOST:.0f} %) of realtime's NE gain, async ≲ realtime (Table 2, pool unit "
            f"{s['pool_unit']}; paper: 89 %)", "2", s["verdict"],
            f"share kept {_fmt_share(s['share'])} {_fmt_share_ci(s['ci'])} (Fieller, n={s['n_seeds']}); realtime vs "
            f"no SUM {_fmt_ci(s['realtime_gain_ci'])} %",
            s["pool_unit"]))
    t3_verdicts = [e[q]["verdict"] for e in t3_diffs for q in ("cosine", "l2_change")]
    out.append(_direction(
        f"average pooling (k={POOL_DEPTH}) raises the day-to-day cosine and lowers the L2 change (Table 3; "
        f"expected by construction, the magnitudes are what is informative)", "3",
        all_of(t3_verdicts) if t3_diffs else NOT_MEASURABLE,
        "; ".join(f"embedding {e['embedding']}: cosine {_said(e['cosine'])}, L2 change {_said(e['l2_change'], 4)}"
                  for e in t3_diffs)))
    ap = next((r for r in t4 if r["setting"] == "ap_effect" and r["subset"] == "all"), None)
    c = (ap or {}).get("eval_ne_diff")
    out.append(_direction(
        f"with AP({POOL_DEPTH}) the downstream eval NE is lower than without pooling (Table 4: offline vs "
        f"offline without AP, paired, below 0)", "4", c["verdict"] if c else NOT_MEASURABLE,
        f"eval NE diff of AP({POOL_DEPTH}) vs no AP {_said(c)} %" if c else "not measured"))
    return out


def _fmt_share(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f} %"


def _fmt_share_ci(ci: Sequence[float] | None) -> str:
    return "[unbounded: realtime's own gain is not established]" if not ci else \
        f"[{100 * ci[0]:.0f} %, {100 * ci[1]:.0f} %]"


# ------------------------------------------------------------------------------------------------------ API

def consumer_gate_table(results: Mapping[str, Any], m: "Measured") -> dict[str, Any] | None:
    """The consumer-gated arm: what its gate held, per seed, and its paired contrasts (eval window, all impressions,
    the models' mean) against async and against no SUM; None when the study ran without it."""
    records = results.get("consumer_gate") or []
    if not records or not m.units(GATED_ARM):
        return None
    unit = m.units(GATED_ARM)[0]
    per_seed = []
    for seed in sorted({r["seed"] for r in records}):
        mine = [r for r in records if r["seed"] == seed]
        measured = [r for r in mine if any(c["outcome"] != "not_measurable" for c in r.get("consumers") or [])]
        per_seed.append({"seed": seed, "days": len(mine), "measured": len(measured),
                         "held": [r["ds"] for r in mine if not r["blessed"]],
                         "held_in_window": [r["ds"] for r in mine if not r["blessed"] and not r["warmup"]]})
    return {"pool_unit": unit, "per_seed": per_seed,
            "vs_async": _contrast(m, GATED_ARM, "async", unit, "eval", "all", m.models),
            "vs_none": _contrast(m, GATED_ARM, BASELINE, unit, "eval", "all", m.models)}


def tables(results: Mapping[str, Any]) -> dict[str, Any]:
    """The paper's Tables 1-4, every paired contrast and each direction's verdict, from the study's measurements.

    Returns:
        ``{"table1", "table2", "table3", "table4", "contrasts", "directions"}``:

        - ``table1``: per subset and model, async vs no SUM (eval window, serving's default pool unit):
          ``ne_diff`` (a contrast: mean, ci, bootstrap_ci, n_seeds, per_seed, verdict), ``fi_rank`` (mean and
          interval clipped to ``[1, n_features]``), mean NE without and with;
        - ``table2``: per subset, mode and pool unit, the mode vs no SUM (a contrast over the models' mean),
          per-model means, coverage;
        - ``table3``: ``{"rows": per (embedding, pooling, part) cosine and L2 change over seeds,
          "ap_vs_raw": per embedding the paired depth-POOL_DEPTH minus depth-1 differences}``;
        - ``table4``: per subset, offline without AP and with AP vs no SUM, and the AP effect (offline vs
          offline without AP), each in the early and eval windows;
        - ``contrasts``: every paired contrast (Tables 1, 2 and 4's, and the between-mode ones), plus
          ``shares``: async's share of realtime's gain per pool unit;
        - ``directions``: ``[{"claim", "table", "pool_unit", "verdict", "holds", "evidence"}]``.
    """
    m = Measured(results.get("measurements") or [])
    t1 = _table1(m, results.get("fi_rank") or [], results.get("choices") or {})
    t2 = _table2(m, results.get("choices") or {})
    between = _between_arms(m)
    t3_rows, t3_diffs = _table3(results.get("shift") or [])
    t4 = _table4(m)
    shares = _share_kept(m)
    contrasts = ([{"table": 1, "model": r["model"], **r["ne_diff"]} for r in t1]
                 + [{"table": 2, **r["ne_diff"]} for r in t2] + between
                 + [{"table": 4, **r[f"{w}_ne_diff"]} for r in t4 for w in WINDOWS if r.get(f"{w}_ne_diff")])
    return {
        "table1": t1,
        "table2": t2,
        "table3": {"rows": t3_rows, "ap_vs_raw": t3_diffs},
        "table4": t4,
        "contrasts": {"paired": contrasts, "shares": shares},
        "directions": _directions(t1, [c for c in contrasts if c["table"] == 2], shares, t3_diffs, t4),
        "consumer_gated_arm": consumer_gate_table(results, m),
    }
