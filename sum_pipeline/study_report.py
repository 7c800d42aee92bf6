"""The report of ``sumctl study``: the paper's Tables 1-4 next to ours, each direction's verdict, plots, DVC metrics.

The study (``sum_pipeline/study.py``) measures; :mod:`sum_pipeline.study_stats` turns its measurements into
paired per-seed contrasts with intervals and verdicts; this module only lays them out. Each of the paper's
experiment tables (§6.2 Table 1, §6.4 Table 2, §6.5 Tables 3 and 4) is rebuilt with the paper's rows, and
the paper's own numbers (:data:`PAPER`, transcribed from the paper's text) sit beside ours. Every verdict
word (holds / does not hold / undetermined / not measurable) comes from an interval, never a point estimate.

Written into the report folder::

    report.md                the choices, the runtime, the verdicts, the tables, the plots
    contrasts.png            forest plot: every paired contrast with its interval, one panel per pool unit
    serving_modes.png        Table 2: NE diff per serving mode and pool unit, interval error bars, the paper's
    shift_vs_pooling.png     Table 3: cosine and L2 change vs average-pooling depth k
    ne_per_day.png           downstream NE per eval day and arm (mean over seeds), when the study gives daily NE
    feature_importance.png   permutation importance per feature (Table 1's FI rank), when given
    norms_per_day.png        the upstream embeddings' mean L2 norm per day, when the study logs norms
    metrics.json             the headline numbers, for ``dvc metrics show``
    plots/ne_per_day.csv     plot data, for ``dvc plots show``
    plots/shift_vs_pooling.csv
    results.json             the study's results with the tables derived from them

Everything is a function of ``results`` alone (no clock, no environment), so the same results give the
same bytes: DVC sees a report change only when a number changed.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sum_pipeline.study_stats import (BETWEEN_ARMS, DOES_NOT_HOLD, HOLDS, MOST, NOT_MEASURABLE, TABLE2_MODES,
                                      UNDETERMINED, VERDICTS, tables)
from sum_platform.files import replace_atomically, write_json

__all__ = ["PAPER", "write_report", "render_markdown", "build_metrics"]

#: The paper's numbers (Zhang et al., "Scaling User Modeling", §6). NE diffs are percentages (-0.19 means
#: NE 0.19 % lower with SUM); Table 3's L2 norm change is a percentage too.
PAPER: dict[str, Any] = {
    # Table 1: FB CTR SUM embeddings on production ads models. FI: rank of the SUM embeddings among all of
    # the model's sparse and embedding features ("usually thousands").
    "table1": (
        {"task": "CTR", "domain": "Mobile feed", "ne_diff_pct": -0.19, "fi": 2},
        {"task": "CTR", "domain": "Home feed", "ne_diff_pct": -0.12, "fi": 2},
        {"task": "CTR", "domain": "Mobile story", "ne_diff_pct": -0.16, "fi": 1},
        {"task": "CTR", "domain": "Dynamic ads", "ne_diff_pct": -0.12, "fi": 4},
        {"task": "CTR", "domain": "Marketplace", "ne_diff_pct": -0.08, "fi": 3},
        {"task": "CTR", "domain": "Channel watch", "ne_diff_pct": -0.12, "fi": 2},
        {"task": "CTR", "domain": "Instagram story", "ne_diff_pct": -0.05, "fi": 15},
        {"task": "CTR", "domain": "Messenger inbox", "ne_diff_pct": -0.35, "fi": 1},
        {"task": "Post-imp offsite CVR", "domain": "Mobile feed", "ne_diff_pct": -0.09, "fi": 16},
        {"task": "Post-click offsite CVR", "domain": "Mobile feed", "ne_diff_pct": -0.05, "fi": 13},
        {"task": "MAI CVR", "domain": "Mobile feed", "ne_diff_pct": -0.04, "fi": 24},
        {"task": "Inline CVR", "domain": "Mobile feed", "ne_diff_pct": -0.09, "fi": 5},
    ),
    # Table 2: serving schemes, on a compact (20M FLOPs) user model. Staleness: days between the user
    # model's last training date and the downstream model's first.
    "table2": (
        {"mode": "none", "setting": "Baseline, no SUM", "staleness": None, "ne_diff_pct": 0.0},
        {"mode": "frozen", "setting": "Baseline + SUM (Frozen)", "staleness": "1-month", "ne_diff_pct": -0.034},
        {"mode": "offline", "setting": "Baseline + SUM (Offline Batch)", "staleness": "1-day",
         "ne_diff_pct": -0.094},
        {"mode": "realtime", "setting": "Baseline + SUM (Online Realtime Serving)", "staleness": None,
         "ne_diff_pct": -0.141},
        {"mode": "async", "setting": "Baseline + SUM (Online Async Serving)", "staleness": None,
         "ne_diff_pct": -0.126},
    ),
    # Table 3: similarity of a user's embedding from consecutive days' snapshots. Pooling None = 1 version.
    "table3": (
        {"embedding": 0, "pooling": None, "cosine": 0.87, "l2_change_pct": 13.0},
        {"embedding": 0, "pooling": 3, "cosine": 0.97, "l2_change_pct": 5.0},
        {"embedding": 1, "pooling": None, "cosine": 0.97, "l2_change_pct": 5.0},
        {"embedding": 1, "pooling": 3, "cosine": 0.99, "l2_change_pct": 2.0},
    ),
    # Table 4: downstream NE diff vs the baseline, with and without average pooling (AP) over 3 versions.
    "table4": (
        {"setting": "baseline", "label": "Baseline", "train_ne_diff_pct": 0.0, "eval_ne_diff_pct": 0.0},
        {"setting": "no_ap", "label": "Baseline + SUM w/o AP", "train_ne_diff_pct": -0.081,
         "eval_ne_diff_pct": -0.014},
        {"setting": "ap3", "label": "Baseline + SUM w/ AP", "train_ne_diff_pct": -0.109,
         "eval_ne_diff_pct": -0.127},
    ),
    # Which of Table 1's rows each of our downstream models stands in for (sum_models/downstream.py): a CTR
    # model on the feed the user model is trained on, the conversion models, the tiny Messenger inbox model.
    "table1_analogues": {
        "click": (("CTR", "Mobile feed"),),
        "conversion": (("Post-imp offsite CVR", "Mobile feed"), ("Post-click offsite CVR", "Mobile feed"),
                       ("MAI CVR", "Mobile feed"), ("Inline CVR", "Mobile feed")),
        "inbox": (("CTR", "Messenger inbox"),),
    },
}


ARM_NAMES = {"none": "no SUM", "frozen": "frozen", "offline": "offline batch",
             "offline_raw": "offline batch without AP", "realtime": "online realtime", "async": "online async",
             "async_gated": "online async, consumer-gated"}
PAPER_SETTINGS = {"frozen": "Baseline + SUM (Frozen)", "offline": "Baseline + SUM (Offline Batch)",
                  "realtime": "Baseline + SUM (Online Realtime Serving)",
                  "async": "Baseline + SUM (Online Async Serving)"}
SUBSET_NAMES = {"all": "all impressions", "covered": "impressions every arm serves an embedding (coverage-matched)",
                "returning": "returning users' impressions (users seen before the eval day)"}
VERDICT_COLORS = {HOLDS: "C2", DOES_NOT_HOLD: "C3", UNDETERMINED: "C7", NOT_MEASURABLE: "C7"}
MISSING = "—"

# Precision of our numbers. The paper's are printed with the paper's own precision.
NE_DIGITS = 4
DIFF_DIGITS = 3
RANK_DIGITS = 1
COSINE_DIGITS = 3
L2_PCT_DIGITS = 1

PLOT_DPI = 120


# ---------------------------------------------------------------------------------------------- formatting

def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{float(value):.{digits}f}"


def _with_ci(value: Any, ci: Sequence[Any] | None, digits: int, scale: float = 1.0) -> str:
    """``-2.100 [-2.500, -1.700]``; just the value when there is no interval (one seed)."""
    if value is None:
        return MISSING
    text = _num(scale * value, digits)
    if not ci or len(ci) != 2 or any(c is None for c in ci):
        return text
    return f"{text} [{_num(scale * ci[0], digits)}, {_num(scale * ci[1], digits)}]"


def _stat(s: Mapping[str, Any] | None, digits: int = DIFF_DIGITS, scale: float = 1.0) -> str:
    """A summary over seeds (:func:`sum_pipeline.study_stats.summarize`) as ``mean [lo, hi]``."""
    return MISSING if not s else _with_ci(s.get("mean"), s.get("ci"), digits, scale)


def _interval(ci: Sequence[Any] | None, digits: int) -> str:
    return MISSING if not ci or None in ci else f"[{_num(ci[0], digits)}, {_num(ci[1], digits)}]"


def _below(s: Mapping[str, Any] | None) -> str:
    return MISSING if not s or not s.get("n_seeds") else f"{s.get('n_below_zero', 0)} of {s['n_seeds']}"


def _verdict(s: Mapping[str, Any] | None) -> str:
    return MISSING if not s or not s.get("verdict") else f"**{s['verdict']}**"


def _per_seed(s: Mapping[str, Any] | None, digits: int = 2) -> str:
    if not s:
        return MISSING
    return ", ".join(_num(p["value"], digits) for p in s.get("per_seed", []))


def _paper_num(value: float | None, digits: int) -> str:
    if value is None:
        return MISSING
    return "0" if value == 0 else f"{value:.{digits}f}"


def _pct(value: Any, digits: int = 1) -> str:
    return MISSING if value is None else f"{100.0 * float(value):.{digits}f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _arm(arm: str, unit: Any = None) -> str:
    name = ARM_NAMES.get(arm, arm)
    return f"{name} ({unit})" if unit else name


def _contrast_name(c: Mapping[str, Any]) -> str:
    return f"{_arm(c['arm'])} vs {_arm(c['ref'])}"


def _models(results: Mapping[str, Any]) -> list[str]:
    """Downstream model names: the measurements' order, then any other model seen, alphabetically."""
    order: list[str] = []
    for r in results.get("measurements") or []:
        if r["model"] not in order:
            order.append(r["model"])
    seen = {r["model"] for r in results.get("daily") or []} | {r["model"] for r in results.get("importance") or []}
    return order + sorted(seen - set(order))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _value(v: Any) -> str:
    """A stated choice, on one line."""
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {_value(v[k])}" for k in sorted(v, key=str))
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or MISSING
    if isinstance(v, float):
        return f"{v:g}"
    return MISSING if v is None else str(v)


def _span(days: Any) -> str:
    if isinstance(days, int):
        return f"{days} days"
    days = list(days or [])
    if not days:
        return MISSING
    return days[0] if len(days) == 1 else f"{days[0]} … {days[-1]} ({len(days)} days)"


# --------------------------------------------------------------------------------------------------- tables

def _header(results: Mapping[str, Any]) -> list[str]:
    up, seeds = results.get("upstream") or {}, results.get("seeds") or []
    lines = [
        f"# SUM study on `{results.get('dataset', '?')}`: the paper's Tables 1–4",
        "",
        f"- Days: {_span(results.get('days'))}; eval window {_span(results.get('eval_days'))}",
        f"- Seeds: {len(seeds)} ({', '.join(str(s) for s in seeds) or MISSING})",
        _runtime(results),
    ]
    if up:
        lines.append(f"- Upstream model: preset `{up.get('preset', '?')}`, {up.get('num_embeddings', '?')} "
                     f"embeddings × {up.get('embedding_dim', '?')} floats")
    return lines + [""]


def _runtime(results: Mapping[str, Any]) -> str:
    wall, seeds = results.get("wall_seconds"), len(results.get("seeds") or [])
    if wall is None:
        return f"- Runtime: {MISSING}"
    stages = results.get("stage_seconds") or {}
    workers = (results.get("choices") or {}).get("workers")
    text = f"- Runtime: {wall:.1f} s ({wall / 60:.1f} min) wall for {seeds} seeds on `{results.get('dataset', '?')}`"
    text += f", {workers} worker processes" if workers else ""
    if stages:  # seeds may run in parallel: the stages' sum can exceed the wall time
        text += "; stage time summed over seeds: " + ", ".join(f"{k} {stages[k]:.0f} s" for k in sorted(stages))
    return text


def _how_to_read(results: Mapping[str, Any]) -> list[str]:
    seen = (results.get("choices") or {}).get("downstream_features") or {}
    t1 = [r for r in results.get("table1", []) if r["subset"] == "all"]
    lines = [
        "## How to read this",
        "",
        "- **Paired contrast.** Within each seed (same world, snapshots and initialisation for every arm), "
        "NE diff (%) = 100 × (NE of the arm − NE of the reference) / NE of the reference, per downstream model; "
        "where the paper's row is one model (Tables 2 and 4, the between-mode contrasts) the seed's value is the "
        "mean over our models. Lower is better: a negative diff means the arm's NE is lower.",
        "- `mean [lo, hi]`: the mean over seeds and its 95 % Student-t interval (df = seeds − 1); absent with one "
        "seed. A percentile bootstrap over seeds is given as a cross-check in `results.json` and the contrasts table.",
        f"- **Verdicts** come from the interval only: **{HOLDS}** when the whole interval is on the paper's side, "
        f"**{DOES_NOT_HOLD}** when it is wholly on the other side, **{UNDETERMINED}** when it straddles, "
        f"**{NOT_MEASURABLE}** with fewer than two seeds. A point estimate never decides.",
        "- **FI rank**: rank of the SUM embeddings among all the model's features by permutation importance "
        "(the NE increase when a feature is shuffled) on held-out days; 1 = most important.",
        "- **Magnitudes.** The paper's numbers come from Meta's production models, whose baselines already have "
        "thousands of features; ours are small models whose baseline (the *no SUM* arm) sees only the user "
        "features listed below. The size of SUM's gain here measures how much user signal that baseline lacks, "
        "not how good SUM is; compare directions and orderings, not magnitudes.",
    ]
    if seen or t1:
        lines.append("")
        lines += _table(["Model", "What the baseline (no SUM) sees", "Its eval NE"],
                        [[m, _value(seen.get(m)) if m in seen else "not stated by the study",
                          _num(next((r["ne_without"] for r in t1 if r["model"] == m), None), NE_DIGITS)]
                         for m in (list(seen) if seen else [r["model"] for r in t1])])
    return lines + [""] + _user_signal(results)


def user_signal_means(results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per feature set (each downstream model's, and SUM's user model's), the mean over worlds of each R^2."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in results.get("user_signal") or []:
        for key in ("interest_r2", "click_propensity_r2"):
            if r.get(key) is not None:
                out.setdefault(r["model"], {}).setdefault(key, []).append(float(r[key]))
    return {m: {k: _mean(v) for k, v in keys.items()} for m, keys in out.items()}


def _user_signal(results: Mapping[str, Any]) -> list[str]:
    """SUM's gain per model next to how much of the user its baseline already sees: the study's dose-response."""
    means = user_signal_means(results)
    if not means:
        return []
    t1 = {r["model"]: r for r in results.get("table1", []) if r["subset"] == "all"}
    lines = ["### SUM's gain against the user signal each baseline already has", "",
             "How much of the simulated user's hidden state (interest vector, base click propensity) a linear read "
             "of the features explains, out of sample (R², `sum_platform/downstream_inputs.py`), beside SUM's NE "
             "gain on that model (Table 1). The models see different amounts of the user, but they also differ in "
             "task and size, so the rows are a coarse dose-response across models, not a sweep of one model's "
             "features.", ""]
    rows = []
    for model, r2 in sorted(means.items(), key=lambda kv: kv[1].get("interest_r2") or 0.0):
        row = t1.get(model)
        rows.append([model, _num(r2.get("interest_r2"), 3), _num(r2.get("click_propensity_r2"), 3),
                     _with_ci(row["ne_diff"]["mean"], row["ne_diff"]["ci"], DIFF_DIGITS) if row else
                     "— (the upstream's own features)",
                     row["verdict"] if row else MISSING])
    lines += _table(["Features of", "R² interest", "R² click propensity", "SUM's NE diff % (async vs none)",
                     "verdict"], rows)
    return lines + [""]


def _choices(results: Mapping[str, Any]) -> list[str]:
    choices = results.get("choices") or {}
    lines = ["## Choices", ""]
    if not choices:
        return lines + ["_The study stated no choices._", ""]
    lines += [f"- **{str(k).replace('_', ' ')}**: {_world(choices[k]) if k == 'world' else _value(choices[k])}"
              for k in sorted(choices, key=str)]
    return lines + [""]


def _world(per_seed: Any) -> str:
    """Each seed's world, once when every seed shares it (fixed data), else per seed in seed order."""
    if not isinstance(per_seed, Mapping):
        return _value(per_seed)
    if len({str(v) for v in per_seed.values()}) == 1:
        return f"{_value(next(iter(per_seed.values())))}, every seed"
    return "; ".join(f"seed {k}: {_value(per_seed[k])}" for k in sorted(per_seed, key=lambda s: int(s)))


def _directions(results: Mapping[str, Any]) -> list[str]:
    entries = results.get("directions", [])
    lines = ["## Does the paper's direction hold here?", ""]
    if not entries:
        return lines + ["_No claims checked._", ""]
    counts = {v: sum(1 for d in entries if d.get("verdict") == v) for v in VERDICTS}
    lines += [", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v]) + f" (of {len(entries)}).", ""]
    for d in entries:
        lines.append(f"- **{d.get('verdict', UNDETERMINED)}**: {d.get('claim', '?')}. {d.get('evidence', '')}".rstrip())
    return lines + [""]


def _analogue(model: str) -> tuple[str, str, str]:
    wanted = PAPER["table1_analogues"].get(model, ())
    paper = [r for r in PAPER["table1"] if (r["task"], r["domain"]) in wanted]
    if not paper:
        return MISSING, MISSING, MISSING
    if len(paper) == 1:
        return f"{paper[0]['task']}, {paper[0]['domain']}", _paper_num(paper[0]["ne_diff_pct"], 2), str(paper[0]["fi"])
    diffs, fis = sorted(p["ne_diff_pct"] for p in paper), sorted(p["fi"] for p in paper)
    return (f"{len(paper)} CVR models, {paper[0]['domain']}",
            f"{_paper_num(diffs[0], 2)} … {_paper_num(diffs[-1], 2)}", f"{fis[0]}–{fis[-1]}")


def _table1(results: Mapping[str, Any]) -> list[str]:
    rows = results.get("table1", [])
    lines = ["## Table 1: SUM embeddings on the downstream models", ""]
    if not rows:
        return lines + ["_Not measured._", ""]
    unit = rows[0].get("pool_unit")
    lines += [f"Online async serving (pool unit: {unit or MISSING}) vs no SUM, eval window, paired per seed.", ""]
    for subset in dict.fromkeys(r["subset"] for r in rows):
        mine = [r for r in rows if r["subset"] == subset]
        lines += [f"**Subset: {SUBSET_NAMES.get(subset, subset)}**", ""]
        out = []
        for r in mine:
            analogue, p_diff, p_fi = _analogue(r["model"])
            fi = f"{_stat(r.get('fi_rank'), RANK_DIGITS)} of {r.get('n_features', MISSING)}" if r.get("fi_rank") \
                else MISSING
            out.append([r["model"], _num(r.get("impressions"), 0), _num(r.get("ne_without"), NE_DIGITS),
                        _num(r.get("ne_with"), NE_DIGITS), _stat(r["ne_diff"]), _verdict(r["ne_diff"]),
                        _interval(r["ne_diff"].get("bootstrap_ci"), DIFF_DIGITS), _below(r["ne_diff"]),
                        fi, analogue, p_diff, p_fi])
        lines += _table(["Model", "Eval impressions (mean per seed)", "NE without SUM", "NE with SUM",
                         "NE diff vs no SUM (%)", "Verdict (diff < 0)", "Bootstrap interval", "Seeds with diff < 0",
                         "FI rank of SUM",
                         "Paper analogue", "Paper NE diff (%)", "Paper FI"], out)
        lines.append("")
    lines += ["Paper's Table 1 (FB CTR SUM on production ads models; FI among usually thousands of features):", ""]
    lines += _table(["Task", "Domain", "NE diff (%)", "FI"],
                    [[p["task"], p["domain"], _paper_num(p["ne_diff_pct"], 2), str(p["fi"])] for p in PAPER["table1"]])
    per_seed = [(r["model"], s) for r in rows if r["subset"] == "all" for s in r.get("per_seed", [])]
    if per_seed:
        lines += ["", "Per seed (all eval impressions):", ""]
        lines += _table(["Model", "Seed", "NE without SUM", "NE with SUM", "NE diff (%)", "FI rank"],
                        [[m, str(s.get("seed")), _num(s.get("ne_without"), NE_DIGITS),
                          _num(s.get("ne_with"), NE_DIGITS), _num(s.get("ne_diff_pct"), DIFF_DIGITS),
                          _num(s.get("fi_rank"), 0)] for m, s in per_seed])
    return lines + [""]


def _units(results: Mapping[str, Any]) -> list[Any]:
    """The pool units Table 2 was measured under ([None] when no arm pools per request)."""
    found = [r["pool_unit"] for r in results.get("table2", []) if r.get("pool_unit")]
    return list(dict.fromkeys(found)) or [None]


def _table2(results: Mapping[str, Any]) -> list[str]:
    rows = results.get("table2", [])
    lines = ["## Table 2: serving schemes", ""]
    if not rows:
        return lines + ["_Not measured._", ""]
    lines += ["Each mode vs no SUM, eval window, paired per seed (mean over the downstream models); async and "
              "realtime under each pool unit (`snapshot`: the row pools the last snapshot versions, a write of the "
              "current snapshot replaces its slot; `write`: every write shifts the history). Frozen and the offline "
              "batch do not pool per request, so their rows are the same under both units.", ""]
    paper = {p["mode"]: p for p in PAPER["table2"]}
    models = _models(results)
    contrasts = (results.get("contrasts") or {}).get("paired", [])
    shares = {s["pool_unit"]: s for s in (results.get("contrasts") or {}).get("shares", [])}
    for subset in dict.fromkeys(r["subset"] for r in rows):
        for unit in _units(results):
            lines += [f"**Pool unit: {unit or MISSING}; subset: {SUBSET_NAMES.get(subset, subset)}**", ""]
            mine = [r for r in rows if r["subset"] == subset and r.get("pool_unit") in (None, unit)]
            mine.sort(key=lambda r: TABLE2_MODES.index(r["mode"]) if r["mode"] in TABLE2_MODES else 99)
            out = [[paper["none"]["setting"], MISSING, "0", MISSING] + ["0"] * len(models)
                   + [MISSING, MISSING, "0"]]
            for r in mine:
                p = paper.get(r["mode"])
                out.append([PAPER_SETTINGS.get(r["mode"], _arm(r["mode"])), r.get("staleness") or MISSING,
                            _stat(r["ne_diff"]), _verdict(r["ne_diff"])]
                           + [_num((r.get("per_model") or {}).get(m), DIFF_DIGITS) for m in models]
                           + [_pct(r.get("coverage")), (p["staleness"] or MISSING) if p else MISSING,
                              _paper_num(p["ne_diff_pct"], 3) if p else MISSING])
            lines += _table(["Model setting", "Staleness here", "NE diff vs no SUM (%)", "Verdict (diff < 0)"]
                            + [f"{m}: NE diff (%)" for m in models]
                            + ["Coverage", "Paper staleness", "Paper NE diff (%)"], out)
            between = [c for c in contrasts if c["table"] == 2 and c["ref"] != "none" and c["subset"] == subset
                       and c.get("pool_unit") in (None, unit)]
            order = {pair: i for i, pair in enumerate(BETWEEN_ARMS)}
            between.sort(key=lambda c: order.get((c["arm"], c["ref"]), 99))
            if between:
                lines += ["", "Between modes (paired per seed; the paper's side is below 0: the first arm has the "
                          "lower NE):", ""]
                lines += _table(["Contrast", "NE diff (%)", "Verdict", "Bootstrap interval", "Per seed"],
                                [[_contrast_name(c), _stat(c), _verdict(c),
                                  _interval(c.get("bootstrap_ci"), DIFF_DIGITS), _per_seed(c)]
                                 for c in between])
            share = shares.get(unit)
            if share and subset == "all":
                p_share = paper["async"]["ne_diff_pct"] / paper["realtime"]["ne_diff_pct"]
                lines += ["", f"Share of realtime's NE gain that async keeps: {_pct(share.get('share'), 0)} "
                          + (f"[{_pct(share['ci'][0], 0)}, {_pct(share['ci'][1], 0)}]" if share.get("ci") else
                             "[no bounded interval: realtime's own gain is not established]")
                          + f" (Fieller's interval, {share.get('n_seeds')} seeds; paper {_pct(p_share, 0)}): "
                          f"**{share['verdict']}** that async keeps more than {_pct(MOST, 0)}."]
            lines.append("")
    return lines + ["![NE diff per serving mode](serving_modes.png)", "",
                    "![Paired contrasts with their intervals](contrasts.png)", ""]


def _table3(results: Mapping[str, Any]) -> list[str]:
    t3 = results.get("table3") or {}
    rows = t3.get("rows", []) if isinstance(t3, Mapping) else []
    lines = ["## Table 3: embedding distribution shift", "",
             "Similarity of a fixed user set's embedding between consecutive days' daily batch versions; avg pooling "
             "k = versions averaged (None = 1); mean over seeds with its interval.", ""]
    if not rows:
        return lines + ["_Not measured._", ""]
    paper = {(p["embedding"], p["pooling"] or 1): p for p in PAPER["table3"]}
    total = [r for r in rows if r["part"] == "total"]
    out = []
    for r in total:
        p = paper.get((r["embedding"], r["pooling"]))
        out.append([f"Embedding {r['embedding']}", "None" if r["pooling"] == 1 else str(r["pooling"]),
                    _stat(r["cosine"], COSINE_DIGITS), _stat(r["l2_change"], L2_PCT_DIGITS, 100.0),
                    _paper_num(p["cosine"], 2) if p else MISSING, f"{p['l2_change_pct']:.0f}" if p else MISSING])
    lines += _table(["Embedding", "Avg pooling", "Cosine", "L2 norm change (%)", "Paper cosine",
                     "Paper L2 norm change (%)"], out)
    parts = [r for r in rows if r["part"] != "total"]
    if parts:
        lines += ["", "The day-to-day shift split into its sources: the snapshot part (the same day's features "
                  "through today's vs yesterday's snapshot) and the features part (yesterday's snapshot on today's "
                  "vs yesterday's features):", ""]
        lines += _table(["Embedding", "Avg pooling", "Part", "Cosine", "L2 norm change (%)"],
                        [[f"Embedding {r['embedding']}", "None" if r["pooling"] == 1 else str(r["pooling"]), r["part"],
                          _stat(r["cosine"], COSINE_DIGITS), _stat(r["l2_change"], L2_PCT_DIGITS, 100.0)]
                         for r in parts])
    diffs = t3.get("ap_vs_raw", [])
    if diffs:
        lines += ["", "Average pooling vs none, paired per seed (depth k minus depth 1):", ""]
        lines += _table(["Embedding", "Depths", "Cosine change", "Verdict (> 0)", "L2 change change (pp)",
                         "Verdict (< 0)"],
                        [[f"Embedding {e['embedding']}", " − ".join(str(k) for k in e["pooling"][::-1]),
                          _stat(e["cosine"], COSINE_DIGITS), _verdict(e["cosine"]),
                          _stat(e["l2_change"], L2_PCT_DIGITS, 100.0), _verdict(e["l2_change"])] for e in diffs])
    lines += ["", "The direction is expected by construction: averaging k consecutive, partly independent versions "
              "always raises the day-to-day cosine and lowers the L2 change. What is informative is the magnitude "
              "(ours beside the paper's) and, where given, how much of the shift the snapshot and the features "
              "each cause."]
    return lines + ["", "![Shift vs pooling](shift_vs_pooling.png)", ""]


def _table4(results: Mapping[str, Any]) -> list[str]:
    rows = results.get("table4", [])
    lines = ["## Table 4: average pooling on the downstream model", ""]
    if not rows:
        return lines + ["_Not measured._", ""]
    lines += ["The offline batch served raw (no AP) and pooled over its last daily versions (AP), each vs no SUM, "
              "paired per seed. **Early-window NE diff** is over the days before the eval window, each day scored "
              "before the downstream trains on it; it is *not* a training NE, so the paper's train column (NE on "
              "data the downstream has trained on) has no counterpart here, and early vs eval compares early with "
              "late days of the same progressive evaluation.", ""]
    paper = {p["setting"]: p for p in PAPER["table4"]}
    labels = {"no_ap": "Baseline + SUM w/o AP", "ap_effect": "AP effect: w/ AP vs w/o AP"}
    for subset in dict.fromkeys(r["subset"] for r in rows):
        lines += [f"**Subset: {SUBSET_NAMES.get(subset, subset)}**", ""]
        out = [["Baseline", "0", MISSING, "0", MISSING, "0", "0"]]
        for r in (r for r in rows if r["subset"] == subset):
            p = paper.get(r["setting"])
            if r["setting"] == "ap_effect":
                p_early = p_eval = MISSING
                no, ap = paper["no_ap"], next(v for k, v in paper.items() if k.startswith("ap"))
                p_early = f"{ap['train_ne_diff_pct'] - no['train_ne_diff_pct']:+.3f} pp"
                p_eval = f"{ap['eval_ne_diff_pct'] - no['eval_ne_diff_pct']:+.3f} pp"
            else:
                p_early = _paper_num(p["train_ne_diff_pct"], 3) if p else MISSING
                p_eval = _paper_num(p["eval_ne_diff_pct"], 3) if p else MISSING
            label = labels.get(r["setting"], f"Baseline + SUM w/ AP (k={r['setting'][2:]})")
            out.append([label, _stat(r.get("early_ne_diff")), _verdict(r.get("early_ne_diff")),
                        _stat(r.get("eval_ne_diff")), _verdict(r.get("eval_ne_diff")), p_early, p_eval])
        lines += _table(["Model setting", "Early-window NE diff (%)", "Verdict (< 0)", "Eval-window NE diff (%)",
                         "Verdict (< 0)", "Paper train NE diff (%)", "Paper eval NE diff (%)"], out)
        lines.append("")
    return lines + ["The AP effect row is the paired contrast of the pooled and the raw offline arm (its reference is "
                    "the raw arm, so it is a % of that arm's NE); the paper's is the difference of its two rows.", ""]


def _figures_section(results: Mapping[str, Any]) -> list[str]:
    lines = ["## Plots", ""]
    if results.get("daily"):
        lines += ["![Downstream NE per eval day](ne_per_day.png)", ""]
    if results.get("importance"):
        lines += ["![Feature importance](feature_importance.png)", ""]
    if results.get("norms"):
        lines += ["![Embedding norms per day](norms_per_day.png)", ""]
    return lines if len(lines) > 2 else []


def _consumer_gated(results: Mapping[str, Any]) -> list[str]:
    g = results.get("consumer_gated_arm")
    if not g:
        return []
    lines = ["## The consumer-gated arm", "",
             "Online async served only by the snapshots the consumer check passes: a second upstream chain, trained "
             "as the first, where a candidate is promoted unless a downstream model (trained day by day on what that "
             "chain served, as `sum_downstream` trains after each promotion) loses NE on the day's consumer holdout "
             "beyond `gate.consumer_max_ne_regression_pct` with its interval above 0 (validation/consumers.py); a "
             "held candidate leaves the last passed snapshot serving and the next one warm-starts from it. The "
             "proxies do not gate this chain. Paired per seed, eval window, all impressions, the models' mean "
             f"(pool unit {g['pool_unit']}).", ""]
    lines += _table(["Contrast", "NE diff (%)", "Verdict (diff < 0)", "Per seed"],
                    [[_contrast_name(c), _stat(c), _verdict(c), _per_seed(c)] for c in (g["vs_async"], g["vs_none"])])
    lines += ["", "What the consumer check did, per seed (days: every day the chain trained, warm-up included; "
              "measured: a consumer was measurable, with enough of each label on the day's consumer holdout):", ""]
    lines += _table(["Seed", "Days", "Measured", "Held (window days)", "Held (warm-up days)"],
                    [[str(r["seed"]), str(r["days"]), str(r["measured"]), ", ".join(r["held_in_window"]) or "none",
                      ", ".join(d for d in r["held"] if d not in r["held_in_window"]) or "none"]
                     for r in g["per_seed"]])
    return lines + [""]


def render_markdown(results: Mapping[str, Any]) -> str:
    """``report.md``'s text for ``results`` (with its tables: :func:`sum_pipeline.study_stats.tables`)."""
    parts = (_header(results) + _how_to_read(results) + _choices(results) + _directions(results) + _table1(results)
             + _table2(results) + _consumer_gated(results) + _table3(results) + _table4(results)
             + _figures_section(results))
    return "\n".join(parts).rstrip() + "\n"


# -------------------------------------------------------------------------------------------- metrics, csv

def _headline(s: Mapping[str, Any] | None) -> dict[str, Any]:
    s = s or {}
    ci = s.get("ci") or [None, None]
    return {"mean": s.get("mean"), "ci_low": ci[0], "ci_high": ci[1], "verdict": s.get("verdict")}


def build_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers, nested one level per table (``dvc metrics show`` flattens them)."""
    t1 = {r["model"]: {"ne_without": r.get("ne_without"), "ne_with": r.get("ne_with"),
                       "ne_diff_pct": _headline(r["ne_diff"]),
                       "fi_rank": (r.get("fi_rank") or {}).get("mean"), "n_features": r.get("n_features")}
          for r in results.get("table1", []) if r["subset"] == "all"}
    t2 = {f"{r['mode']}_{r['pool_unit']}" if r.get("pool_unit") else r["mode"]:
          {"ne_diff_pct": _headline(r["ne_diff"]), "coverage": r.get("coverage")}
          for r in results.get("table2", []) if r["subset"] == "all"}
    contrasts = {f"{c['arm']}_vs_{c['ref']}" + (f"_{c['pool_unit']}" if c.get("pool_unit") else ""): _headline(c)
                 for c in (results.get("contrasts") or {}).get("paired", [])
                 if c["table"] == 2 and c["ref"] != "none" and c["subset"] == "all"}
    shares = {f"async_share_of_realtime_{s['pool_unit']}": {"share": s.get("share"), "verdict": s.get("verdict")}
              for s in (results.get("contrasts") or {}).get("shares", [])}
    t3: dict[str, dict[str, Any]] = {}
    for r in (results.get("table3") or {}).get("rows", []):
        if r["part"] == "total":
            e = t3.setdefault(f"embedding_{r['embedding']}", {})
            e[f"k{r['pooling']}_cosine"] = r["cosine"].get("mean")
            e[f"k{r['pooling']}_l2_change"] = r["l2_change"].get("mean")
    t4 = {r["setting"]: {"early_ne_diff_pct": _headline(r.get("early_ne_diff")),
                         "eval_ne_diff_pct": _headline(r.get("eval_ne_diff"))}
          for r in results.get("table4", []) if r["subset"] == "all"}
    dirs = results.get("directions", [])
    return {"dataset": results.get("dataset"), "wall_seconds": results.get("wall_seconds"),
            "seeds": len(results.get("seeds") or []), "table1": t1, "table2": t2, "contrasts": {**contrasts, **shares},
            "table3": t3, "table4": t4,
            "directions": {v.replace(" ", "_"): sum(1 for d in dirs if d.get("verdict") == v) for v in VERDICTS}}


def _arm_of(r: Mapping[str, Any]) -> str:
    """A daily record's arm, with its pool unit when it has one (``async (snapshot)``)."""
    arm = r.get("arm", r.get("mode"))
    return f"{arm} ({r['pool_unit']})" if r.get("pool_unit") else arm


def daily_means(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Downstream NE per (eval day, arm, model), mean over seeds, sorted; all days when none is an eval day."""
    eval_days = set(results.get("eval_days") or []) if not isinstance(results.get("eval_days"), int) else set()
    daily = results.get("daily") or []
    if eval_days and any(r["ds"] in eval_days for r in daily):
        daily = [r for r in daily if r["ds"] in eval_days]
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in daily:
        if r.get("ne") is not None:
            groups.setdefault((r["ds"], _arm_of(r), r["model"]), []).append(float(r["ne"]))
    return [{"ds": ds, "mode": arm, "model": model, "ne": _mean(v)} for (ds, arm, model), v in sorted(groups.items())]


def _csv_text(fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_text(path: Path, text: str) -> Path:
    with replace_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- plots

def _new_figure(ncols: int, width_per_panel: float = 5.0, height: float = 4.0):
    """A figure on its own Agg canvas: no pyplot, so no global backend switch and no figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # At least 8 inches wide: a lone panel still has room for the figure's title.
    fig = Figure(figsize=(max(width_per_panel * max(ncols, 1), 8.0), height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, max(ncols, 1), i + 1) for i in range(max(ncols, 1))]
    return fig, axes


def _save_png(fig: Any, path: Path) -> Path:
    # No "Software" (matplotlib version) chunk: the bytes depend on the numbers only.
    with replace_atomically(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return path


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the results", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _error(value: float, ci: Sequence[float] | None) -> tuple[float, float] | None:
    if not ci or len(ci) != 2 or None in ci:
        return None
    return max(value - float(ci[0]), 0.0), max(float(ci[1]) - value, 0.0)


def _forest_rows(results: Mapping[str, Any], unit: Any) -> list[Mapping[str, Any]]:
    """The eval-window contrasts on all impressions seen under ``unit``: each mode vs no SUM, then between modes."""
    seen, out = set(), []
    for c in (results.get("contrasts") or {}).get("paired", []):
        key = (c["arm"], c["ref"], c.get("pool_unit"))
        if (c["table"] in (2, 4) and c["window"] == "eval" and c["subset"] == "all"
                and c.get("pool_unit") in (None, unit) and key not in seen):
            seen.add(key)
            out.append(c)
    modes = ("frozen", "offline_raw", "offline", "realtime", "async")
    order = {**{(m, "none"): i for i, m in enumerate(modes)},
             **{pair: len(modes) + i for i, pair in enumerate(BETWEEN_ARMS)}}
    return sorted(out, key=lambda c: order.get((c["arm"], c["ref"]), 99))


def _plot_contrasts(results: Mapping[str, Any], path: Path) -> Path:
    from matplotlib.lines import Line2D

    units = _units(results)
    panels = [(u, _forest_rows(results, u)) for u in units]
    most = max((len(rows) for _, rows in panels), default=1)
    fig, axes = _new_figure(len(panels), width_per_panel=5.5, height=max(3.0, 1.4 + 0.35 * most))
    fig.suptitle("Paired contrasts: NE diff (%) with 95 % t interval over seeds (left of 0: first arm's NE lower)")
    ends = [x for _, rows in panels for c in rows for x in [c.get("mean"), *(c.get("ci") or [])] if x is not None]
    for ax, (unit, rows) in zip(axes, panels):
        if not rows:
            _no_data(ax, "paired contrasts")
            continue
        points: dict[str, list[tuple[float, int, tuple[float, float] | None]]] = {}
        for y, c in enumerate(reversed(rows)):
            if c.get("mean") is not None:
                points.setdefault(c.get("verdict") or NOT_MEASURABLE, []).append(
                    (c["mean"], y, _error(c["mean"], c.get("ci"))))
        for v, pts in sorted(points.items()):  # one call per verdict: its colour
            color = VERDICT_COLORS.get(v, "C7")
            bars = [p for p in pts if p[2]]
            if bars:
                ax.errorbar([p[0] for p in bars], [p[1] for p in bars],
                            xerr=[[p[2][0] for p in bars], [p[2][1] for p in bars]], fmt="o", color=color, capsize=3)
            bare = [p for p in pts if not p[2]]  # no interval (one seed): a hollow point, no bar
            if bare:
                ax.plot([p[0] for p in bare], [p[1] for p in bare], "o", color=color, markerfacecolor="none")
        ax.set_yticks(range(len(rows)), [_contrast_name(c) for c in reversed(rows)], fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.6)
        between = sum(1 for c in rows if c["ref"] != "none")
        if 0 < between < len(rows):  # a rule between "vs no SUM" and the between-mode contrasts
            ax.axhline(between - 0.5, color="black", linewidth=0.4, linestyle="--")
        if ends:  # one scale in every panel, zero included
            pad = 0.05 * (max(ends + [0.0]) - min(ends + [0.0]) or 1.0)
            ax.set_xlim(min(ends + [0.0]) - pad, max(ends + [0.0]) + pad)
        ax.set_title(f"pool unit: {unit}" if unit else "all arms")
        ax.set_xlabel("NE diff (%)")
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="none", color=VERDICT_COLORS[v], label=v) for v in VERDICTS[:3]]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="verdict")
    return _save_png(fig, path)


def _plot_ne_per_day(results: Mapping[str, Any], means: list[dict[str, Any]], path: Path) -> Path:
    models = [m for m in _models(results) if any(r["model"] == m for r in means)]
    fig, axes = _new_figure(len(models))
    fig.suptitle("Downstream NE per eval day, by arm (mean over seeds)")
    if not models:
        _no_data(axes[0], "daily NE")
    days = sorted({r["ds"] for r in means})
    x_of = {ds: i for i, ds in enumerate(days)}
    for ax, model in zip(axes, models):
        rows = [r for r in means if r["model"] == model]
        for arm in sorted({r["mode"] for r in rows}, key=lambda a: (a != "none", a)):
            pts = [(x_of[r["ds"]], r["ne"]) for r in rows if r["mode"] == arm]
            style = dict(color="black", linestyle="--", marker="x") if arm == "none" else dict(marker="o")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=arm, **style)
        ax.set_title(model)
        ax.set_xlabel("eval day")
        ax.set_ylabel("NE (lower is better)")
        ax.set_xticks(range(len(days)), days, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    if models:  # every panel has the same arms: one legend, outside, so no line is hidden
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="arm")
    return _save_png(fig, path)


def _plot_shift(results: Mapping[str, Any], path: Path) -> Path:
    rows = sorted((results.get("table3") or {}).get("rows", []),
                  key=lambda r: (r["embedding"], r["part"], r["pooling"]))
    fig, (ax_cos, ax_l2) = _new_figure(2)
    fig.suptitle("Embedding shift between consecutive days vs average-pooling depth "
                 "(Table 3; 95 % interval over seeds)")
    embeddings = sorted({r["embedding"] for r in rows})
    colors = {e: f"C{i}" for i, e in enumerate(embeddings)}
    styles = {"total": "-", "snapshot": ":", "features": "--"}
    for e in embeddings:
        for part in sorted({r["part"] for r in rows if r["embedding"] == e}, key=lambda p: (p != "total", p)):
            mine = [r for r in rows if r["embedding"] == e and r["part"] == part]
            ks = [r["pooling"] for r in mine]
            label = f"embedding {e}" + ("" if part == "total" else f" ({part} part)")
            for ax, q, scale in ((ax_cos, "cosine", 1.0), (ax_l2, "l2_change", 100.0)):
                ys = [scale * (r[q]["mean"] or math.nan) for r in mine]
                errs = [_error(r[q]["mean"] or 0.0, r[q].get("ci")) or (0.0, 0.0) for r in mine]
                ax.errorbar(ks, ys, yerr=[[scale * lo for lo, _ in errs], [scale * hi for _, hi in errs]],
                            marker="o", capsize=3, color=colors[e], linestyle=styles.get(part, "-."), label=label)
        paper = [p for p in PAPER["table3"] if p["embedding"] == e]
        if paper:  # the paper's two points (k = None, 3), hollow
            pk = [p["pooling"] or 1 for p in paper]
            kw = dict(marker="s", linestyle="none", markerfacecolor="none", color=colors[e], label=f"paper emb {e}")
            ax_cos.plot(pk, [p["cosine"] for p in paper], **kw)
            ax_l2.plot(pk, [p["l2_change_pct"] for p in paper], **kw)
    for ax, ylabel, title in ((ax_cos, "mean cosine similarity", "Cosine (higher = more stable)"),
                              (ax_l2, "mean L2 norm change (%)", "L2 change (lower = more stable)")):
        ax.set_title(title)
        ax.set_xlabel("average pooling k (1 = none)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if rows:
            ax.set_xticks(sorted({r["pooling"] for r in rows}))
            ax.legend(fontsize=7)
        else:
            _no_data(ax, "Table 3 rows")
    return _save_png(fig, path)


def _importance_means(results: Mapping[str, Any]) -> dict[str, list[tuple[str, str, float, float]]]:
    """Per model: ``(feature, kind, mean NE increase, mean reported std)``, most important first."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results.get("importance") or []:
        groups.setdefault((r["model"], r["feature"]), []).append(r)
    out: dict[str, list[tuple[str, str, float, float]]] = {}
    for (model, feature), rs in sorted(groups.items()):
        stds = [float(r["ne_increase_std"]) for r in rs if r.get("ne_increase_std") is not None]
        out.setdefault(model, []).append((feature, rs[0].get("kind", ""), _mean([float(r["ne_increase"]) for r in rs]),
                                          _mean(stds) if stds else 0.0))
    for model in out:
        out[model].sort(key=lambda t: (-t[2], t[0]))
    return out


def _plot_importance(results: Mapping[str, Any], path: Path, top: int = 25) -> Path:
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    per_model = _importance_means(results)
    models = [m for m in _models(results) if m in per_model]
    most = max((min(len(v), top) for v in per_model.values()), default=1)
    fig, axes = _new_figure(len(models), height=max(3.0, 1.2 + 0.3 * most))
    fig.suptitle("Permutation feature importance on held-out days (mean NE increase when shuffled)")
    if not models:
        _no_data(axes[0], "feature importance")
    for ax, model in zip(axes, models):
        feats = per_model[model][:top][::-1]  # barh draws bottom-up: most important on top
        colors = ["C3" if kind == "sum_embedding" else "C7" for _, kind, _, _ in feats]
        ax.barh(range(len(feats)), [f[2] for f in feats], xerr=[f[3] for f in feats], color=colors,
                error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.set_yticks(range(len(feats)), [f[0] for f in feats], fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.6)
        shown = f" (top {top} of {len(per_model[model])})" if len(per_model[model]) > top else ""
        ax.set_title(model + shown)
        ax.set_xlabel("NE increase")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    if models:
        fig.legend(handles=[Patch(color="C3", label="SUM embedding"), Patch(color="C7", label="other feature")],
                   loc="outside right upper", fontsize=8)
    return _save_png(fig, path)


def _plot_serving_modes(results: Mapping[str, Any], path: Path) -> Path:
    rows = [r for r in results.get("table2", []) if r["subset"] == "all" and r["ne_diff"].get("mean") is not None]
    units = _units(results)
    fig, (ax, ax_paper) = _new_figure(2, width_per_panel=4.5)
    fig.suptitle("NE diff vs no SUM (%) per serving mode (Table 2; lower is better)")
    modes = [m for m in TABLE2_MODES if any(r["mode"] == m for r in rows)]
    width = 0.8 / max(len(units), 1)
    for j, unit in enumerate(units):
        xs, ys, lo, hi = [], [], [], []
        for i, mode in enumerate(modes):
            r = next((r for r in rows if r["mode"] == mode and r.get("pool_unit") in (unit, None)), None)
            if r is None:
                continue
            v = float(r["ne_diff"]["mean"])
            err = _error(v, r["ne_diff"].get("ci")) or (0.0, 0.0)
            xs.append(i + (j - (len(units) - 1) / 2) * width)
            ys.append(v)
            lo.append(err[0])
            hi.append(err[1])
        ax.bar(xs, ys, width=width, color=f"C{j}", label=f"pool unit {unit}" if unit else "here",
               yerr=[lo, hi], capsize=3, error_kw={"elinewidth": 0.8})
    if modes:
        ax.set_xticks(range(len(modes)), [ARM_NAMES[m] for m in modes], rotation=20, ha="right")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "Table 2 rows")
    ax.set_title(f"here ({results.get('dataset', '?')}; bars: 95 % interval)")
    paper = [p for p in PAPER["table2"] if p["mode"] != "none"]
    ax_paper.bar(range(len(paper)), [p["ne_diff_pct"] for p in paper], color="C7", label="paper")
    ax_paper.set_xticks(range(len(paper)), [ARM_NAMES[p["mode"]] for p in paper], rotation=20, ha="right")
    ax_paper.set_title("paper (Table 2)")
    ax_paper.legend(fontsize=8)
    for a in (ax, ax_paper):
        a.axhline(0.0, color="black", linewidth=0.6)
        a.set_xlabel("serving mode")
        a.set_ylabel("NE diff vs no SUM (%)")
        a.grid(axis="y", alpha=0.3)
    return _save_png(fig, path)


def _plot_norms(results: Mapping[str, Any], path: Path) -> Path:
    rows = results.get("norms") or []
    embeddings = sorted({int(r["embedding"]) for r in rows})
    fig, axes = _new_figure(len(embeddings))
    fig.suptitle("Upstream embeddings' mean L2 norm per day (thin: one seed; thick: mean over seeds)")
    if not embeddings:
        _no_data(axes[0], "norms")
    days = sorted({r["ds"] for r in rows})
    x_of = {ds: i for i, ds in enumerate(days)}
    values = [float(r["mean_l2"]) for r in rows if r.get("mean_l2")]
    log = bool(values) and min(values) > 0 and max(values) / min(values) > 20  # a growth of orders of magnitude
    for ax, e in zip(axes, embeddings):
        mine = [r for r in rows if int(r["embedding"]) == e and r.get("mean_l2") is not None]
        for seed in sorted({r["seed"] for r in mine}):
            pts = sorted((x_of[r["ds"]], float(r["mean_l2"])) for r in mine if r["seed"] == seed)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="C0", alpha=0.3, linewidth=0.8)
        by_day: dict[int, list[float]] = {}
        for r in mine:
            by_day.setdefault(x_of[r["ds"]], []).append(float(r["mean_l2"]))
        xs = sorted(by_day)
        ax.plot(xs, [_mean(by_day[x]) for x in xs], color="C0", linewidth=2.0, label="mean over seeds")
        warm = sorted({x_of[r["ds"]] for r in mine if r.get("warmup")})
        if warm:  # the upstream's warm-up before the study window
            ax.axvspan(warm[0] - 0.5, warm[-1] + 0.5, color="C7", alpha=0.15, label="warm-up")
            ax.legend(fontsize=8)
        ax.set_title(f"embedding {e}")
        ax.set_xlabel("day")
        ax.set_ylabel("mean L2 norm" + (" (log scale)" if log else ""))
        if log:
            ax.set_yscale("log")
        step = max(1, len(days) // 8)
        ax.set_xticks(range(0, len(days), step), days[::step], rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    return _save_png(fig, path)


# ------------------------------------------------------------------------------------------------------ API

def with_tables(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results`` with its tables, contrasts and directions derived from its measurements (empty when it has none)."""
    return {**results, **tables(results)}


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Writes the study's report, plots, metrics and plot data into ``out_dir``.

    Args:
        results: The study's results (the schema in :mod:`sum_pipeline.study_stats`); the tables are derived
            from its measurements here, so a stale table in ``results`` never reaches the report.
        out_dir: The report folder (created if missing); files already there are replaced.

    Returns:
        Every file written, by its path relative to ``out_dir`` (``"report.md"``, ``"plots/ne_per_day.csv"``, ...).
    """
    import matplotlib
    import matplotlib.style

    results = with_tables(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def put(name: str, path: Path) -> None:
        written[name] = path

    means = daily_means(results)
    # The default style, whatever the user's matplotlibrc says: the same results give the same pixels.
    with matplotlib.style.context("default"), matplotlib.rc_context({"svg.hashsalt": "sum-study"}):
        put("contrasts.png", _plot_contrasts(results, out_dir / "contrasts.png"))
        put("serving_modes.png", _plot_serving_modes(results, out_dir / "serving_modes.png"))
        put("shift_vs_pooling.png", _plot_shift(results, out_dir / "shift_vs_pooling.png"))
        put("ne_per_day.png", _plot_ne_per_day(results, means, out_dir / "ne_per_day.png"))
        put("feature_importance.png", _plot_importance(results, out_dir / "feature_importance.png"))
        if results.get("norms"):
            put("norms_per_day.png", _plot_norms(results, out_dir / "norms_per_day.png"))

    put("plots/ne_per_day.csv", _write_text(out_dir / "plots" / "ne_per_day.csv",
                                            _csv_text(("ds", "mode", "model", "ne"), means)))
    shift_rows = sorted(({"pooling": r["pooling"], "embedding": r["embedding"], "cosine": r["cosine"]["mean"],
                          "l2_change": r["l2_change"]["mean"]}
                         for r in (results.get("table3") or {}).get("rows", []) if r["part"] == "total"),
                        key=lambda r: (r["pooling"], r["embedding"]))
    put("plots/shift_vs_pooling.csv",
        _write_text(out_dir / "plots" / "shift_vs_pooling.csv",
                    _csv_text(("pooling", "embedding", "cosine", "l2_change"), shift_rows)))
    put("metrics.json", write_json(out_dir / "metrics.json", build_metrics(results)))
    put("results.json", write_json(out_dir / "results.json", results))
    put("report.md", _write_text(out_dir / "report.md", render_markdown(results)))
    return written
