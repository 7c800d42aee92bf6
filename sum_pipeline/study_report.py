"""The report of ``sumctl study``: the paper's Tables 1-4 next to ours, plots, and DVC metrics.

The study (``sum_pipeline/study.py``) measures; this module only lays the numbers out. Each of the paper's
experiment tables (§6.2 Table 1, §6.4 Table 2, §6.5 Tables 3 and 4) is rebuilt with the same rows and
columns, and the paper's own numbers (:data:`PAPER`, transcribed from the paper's text) sit beside ours.
Our downstream models are small and our data is simulated or MovieLens, so the magnitudes are not
comparable to Meta's production models; what can be compared is the direction and the ordering of the
effects, and the study states for each of the paper's claims whether it holds here (``directions``).

Written into the report folder::

    report.md                the tables, the claims that hold / do not hold, the plots
    ne_per_day.png           downstream NE per eval day and serving mode (mean over seeds)
    shift_vs_pooling.png     Table 3: cosine and L2 change vs average-pooling depth k
    feature_importance.png   permutation importance per feature (Table 1's FI rank)
    serving_modes.png        Table 2: NE diff per serving mode, CI error bars
    metrics.json             the headline numbers, for ``dvc metrics show``
    plots/ne_per_day.csv     plot data, for ``dvc plots show``
    plots/shift_vs_pooling.csv
    results.json             the study's results, as given

Everything is a function of ``results`` alone (no clock, no environment), so the same results give the
same bytes: DVC sees a report change only when a number changed.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sum_platform.files import replace_atomically, write_json

__all__ = ["PAPER", "write_report"]

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

# The paper's order of Table 2's rows; unknown modes follow, alphabetically.
MODE_ORDER = ("frozen", "offline", "realtime", "async")
MODE_NAMES = {"none": "no SUM (baseline)", "frozen": "Frozen", "offline": "Offline batch",
              "realtime": "Online realtime", "async": "Online async"}
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
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{float(value):.{digits}f}"


def _with_ci(value: Any, ci: Sequence[Any] | None, digits: int) -> str:
    """``-2.100 [-2.500, -1.700]``; just the value when the CI is absent (one seed)."""
    text = _num(value, digits)
    if value is None or not ci or len(ci) != 2 or any(c is None for c in ci):
        return text
    return f"{text} [{_num(ci[0], digits)}, {_num(ci[1], digits)}]"


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


def _pooling_label(k: Any) -> str:
    return "None" if k in (None, 1) else str(k)


def _mode_rank(mode: str) -> tuple[int, str]:
    return (MODE_ORDER.index(mode), "") if mode in MODE_ORDER else (len(MODE_ORDER), mode)


def _ap_label(setting: str) -> str:
    if setting == "no_ap":
        return "Baseline + SUM w/o AP"
    if setting.startswith("ap") and setting[2:].isdigit():
        return f"Baseline + SUM w/ AP (k={setting[2:]})"
    return f"Baseline + SUM ({setting})"


def _models(results: Mapping[str, Any]) -> list[str]:
    """Downstream model names: Table 1's order, then any other model seen, alphabetically."""
    order = [r["model"] for r in results.get("table1", [])]
    seen = {r["model"] for r in results.get("daily", [])} | {r["model"] for r in results.get("importance", [])}
    for row in results.get("table2", []):
        seen |= set((row.get("per_model") or {}).keys())
    return order + sorted(seen - set(order))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------------- tables

def _header(results: Mapping[str, Any]) -> list[str]:
    days = results.get("days", [])
    train, evald = results.get("train_days", []), results.get("eval_days", [])
    def span(ds: Sequence[str]) -> str:
        if not ds:
            return MISSING
        return ds[0] if len(ds) == 1 else f"{ds[0]} … {ds[-1]} ({len(ds)} days)"

    up = results.get("upstream") or {}
    wall = results.get("wall_seconds")
    lines = [
        f"# SUM study on `{results.get('dataset', '?')}`: the paper's Tables 1–4",
        "",
        f"- Days: {span(days)}; train {span(train)}, eval {span(evald)}",
        f"- Seeds: {', '.join(str(s) for s in results.get('seeds', [])) or MISSING}",
        f"- Wall time: {MISSING if wall is None else f'{wall:.1f} s ({wall / 60:.1f} min)'}"
        + "".join(f"; {stage} {sec:.0f} s" for stage, sec in (results.get("stage_seconds") or {}).items()),
    ]
    if up:
        lines.append(f"- Upstream model: preset `{up.get('preset', '?')}`, {up.get('num_embeddings', '?')} "
                     f"embeddings × {up.get('embedding_dim', '?')} floats")
    return lines + [""]


def _how_to_read() -> list[str]:
    return [
        "## How to read this",
        "",
        "- **NE diff (%)** = (NE with SUM − NE without) / NE without × 100, on held-out (eval) days. "
        "Lower is better: a more negative diff is a larger gain from the SUM embeddings.",
        "- **FI rank**: rank of the SUM embeddings among all the model's features by permutation importance "
        "(the NE increase when a feature is shuffled) on held-out days; 1 = most important.",
        "- `value [lo, hi]`: mean over seeds and the study's confidence interval across seeds "
        "(the interval is absent with a single seed).",
        "- The paper's numbers come from Meta's production models; ours from small models on "
        "`simulated`/`movielens` data. Magnitudes differ by construction; compare directions and orderings.",
        "",
    ]


def _analogue_rows(model: str) -> list[Mapping[str, Any]]:
    wanted = PAPER["table1_analogues"].get(model, ())
    return [r for r in PAPER["table1"] if (r["task"], r["domain"]) in wanted]


def _table1(results: Mapping[str, Any]) -> list[str]:
    rows = results.get("table1", [])
    lines = ["## Table 1: SUM embeddings on the downstream models", ""]
    if not rows:
        return lines + ["_Not measured._", ""]
    out = []
    for r in rows:
        paper = _analogue_rows(r["model"])
        if not paper:
            analogue, p_diff, p_fi = MISSING, MISSING, MISSING
        elif len(paper) == 1:
            analogue = f"{paper[0]['task']}, {paper[0]['domain']}"
            p_diff, p_fi = _paper_num(paper[0]["ne_diff_pct"], 2), str(paper[0]["fi"])
        else:
            diffs, fis = sorted(p["ne_diff_pct"] for p in paper), sorted(p["fi"] for p in paper)
            analogue = f"{len(paper)} CVR models, {paper[0]['domain']}"
            p_diff = f"{_paper_num(diffs[0], 2)} … {_paper_num(diffs[-1], 2)}"
            p_fi = f"{fis[0]}–{fis[-1]}"
        fi = _with_ci(r.get("fi_rank"), r.get("fi_rank_ci"), RANK_DIGITS)
        out.append([r["model"], r.get("label", MISSING), r.get("description", MISSING),
                    _num(r.get("ne_without"), NE_DIGITS), _num(r.get("ne_with"), NE_DIGITS),
                    _with_ci(r.get("ne_diff_pct"), r.get("ne_diff_ci"), DIFF_DIGITS),
                    f"{fi} of {r.get('n_features', MISSING)}", analogue, p_diff, p_fi])
    lines += _table(["Model", "Task (label)", "Description", "NE without", "NE with", "NE diff (%)",
                     "FI rank", "Paper analogue", "Paper NE diff (%)", "Paper FI"], out)
    lines += ["", "Paper's Table 1 (FB CTR SUM on production ads models; FI among usually thousands of features):", ""]
    lines += _table(["Task", "Domain", "NE diff (%)", "FI"],
                    [[p["task"], p["domain"], _paper_num(p["ne_diff_pct"], 2), str(p["fi"])]
                     for p in PAPER["table1"]])
    per_seed = [(r["model"], s) for r in rows for s in r.get("per_seed", [])]
    if per_seed:
        lines += ["", "Per seed:", ""]
        lines += _table(["Model", "Seed", "NE without", "NE with", "NE diff (%)", "FI rank"],
                        [[m, str(s.get("seed")), _num(s.get("ne_without"), NE_DIGITS), _num(s.get("ne_with"), NE_DIGITS),
                          _num(s.get("ne_diff_pct"), DIFF_DIGITS), str(s.get("fi_rank", MISSING))]
                         for m, s in per_seed])
    return lines + [""]


def _kept_gain(results_by_mode: Mapping[str, float | None], mode: str, reference: str) -> float | None:
    """Share of ``reference``'s NE gain that ``mode`` keeps (the paper: async keeps ~90 % of realtime's)."""
    ours, ref = results_by_mode.get(mode), results_by_mode.get(reference)
    if ours is None or ref is None or ref >= 0:
        return None
    return ours / ref


def _table2(results: Mapping[str, Any]) -> list[str]:
    rows = sorted(results.get("table2", []), key=lambda r: _mode_rank(r["mode"]))
    lines = ["## Table 2: serving schemes", ""]
    if not rows:
        return lines + ["_Not measured._", ""]
    paper = {p["mode"]: p for p in PAPER["table2"]}
    models = [m for m in _models(results) if any(m in (r.get("per_model") or {}) for r in rows)]
    header = ["Model setting", "Staleness here", "NE diff (%)"] + [f"{m} (%)" for m in models] + [
        "Coverage", "Fallback rate", "Paper staleness", "Paper NE diff (%)"]
    base = paper["none"]
    out = [[base["setting"], MISSING, "0"] + ["0"] * len(models) + [MISSING, MISSING, MISSING, "0"]]
    for r in rows:
        p = paper.get(r["mode"])
        per_model = r.get("per_model") or {}
        out.append([p["setting"] if p else f"Baseline + SUM ({r['mode']})", r.get("staleness") or MISSING,
                    _with_ci(r.get("ne_diff_pct"), r.get("ne_diff_ci"), DIFF_DIGITS)]
                   + [_num(per_model.get(m), DIFF_DIGITS) for m in models]
                   + [_pct(r.get("coverage")), _pct(r.get("fallback_rate")),
                      (p["staleness"] or MISSING) if p else MISSING,
                      _paper_num(p["ne_diff_pct"], 3) if p else MISSING])
    lines += _table(header, out)

    ours = {r["mode"]: r.get("ne_diff_pct") for r in rows}
    measured = sorted((m for m, v in ours.items() if v is not None), key=lambda m: -ours[m])
    paper_order = "{} < {} < {} ≲ {}".format(*(f"{MODE_NAMES[m].lower()} ({_paper_num(paper[m]['ne_diff_pct'], 3)})"
                                              for m in ("frozen", "offline", "async", "realtime")))
    lines += ["", "Ordering by NE gain (a more negative diff is a larger gain), smallest gain first:", "",
              "- Paper: frozen < offline batch < async ≲ realtime — " + paper_order,
              "- Here: " + (" < ".join(f"{MODE_NAMES.get(m, m).lower()} ({_num(ours[m], DIFF_DIGITS)})"
                                       for m in measured) or MISSING)]
    paper_by_mode = {m: p["ne_diff_pct"] for m, p in paper.items()}
    for mode, ref in (("async", "realtime"), ("offline", "realtime")):
        kept, kept_paper = _kept_gain(ours, mode, ref), _kept_gain(paper_by_mode, mode, ref)
        lines.append(f"- {MODE_NAMES[mode]} keeps {_pct(kept, 0)} of {MODE_NAMES[ref].lower()}'s gain here "
                     f"(paper: {_pct(kept_paper, 0)})")
    return lines + ["", "![NE diff per serving mode](serving_modes.png)", ""]


def _table3(results: Mapping[str, Any]) -> list[str]:
    rows = sorted(results.get("table3", []), key=lambda r: (r["embedding"], r["pooling"]))
    lines = ["## Table 3: embedding distribution shift", "",
             "Average similarity of a user's embedding from consecutive days' snapshots; "
             "avg pooling k = versions averaged (None = 1).", ""]
    if not rows:
        return lines + ["_Not measured._", ""]
    paper = {(p["embedding"], p["pooling"] or 1): p for p in PAPER["table3"]}
    out = []
    for r in rows:
        p = paper.get((r["embedding"], r["pooling"]))
        out.append([f"Embedding {r['embedding']}", _pooling_label(r["pooling"]), _num(r.get("cosine"), COSINE_DIGITS),
                    _pct(r.get("l2_change"), L2_PCT_DIGITS),
                    _paper_num(p["cosine"], 2) if p else MISSING, f"{p['l2_change_pct']:.0f}%" if p else MISSING])
    lines += _table(["Embedding", "Avg pooling", "Cosine", "L2 norm change", "Paper cosine", "Paper L2 norm change"], out)
    return lines + ["", "![Shift vs pooling](shift_vs_pooling.png)", ""]


def _table4(results: Mapping[str, Any]) -> list[str]:
    rows = results.get("table4", [])
    lines = ["## Table 4: average pooling on the downstream model", "",
             "NE diff (%) against the baseline without SUM embeddings.", ""]
    if not rows:
        return lines + ["_Not measured._", ""]
    paper = {p["setting"]: p for p in PAPER["table4"]}
    out = [["Baseline", "0", "0", "0", "0"]]
    for r in sorted(rows, key=lambda r: (r["setting"] != "no_ap", r["setting"])):
        p = paper.get(r["setting"])
        out.append([_ap_label(r["setting"]),
                    _with_ci(r.get("train_ne_diff_pct"), r.get("train_ne_diff_ci"), DIFF_DIGITS),
                    _with_ci(r.get("eval_ne_diff_pct"), r.get("eval_ne_diff_ci"), DIFF_DIGITS),
                    _paper_num(p["train_ne_diff_pct"], 3) if p else MISSING,
                    _paper_num(p["eval_ne_diff_pct"], 3) if p else MISSING])
    lines += _table(["Model setting", "Train NE (%)", "Eval NE (%)", "Paper train NE (%)", "Paper eval NE (%)"], out)
    return lines + [""]


def _directions(results: Mapping[str, Any]) -> list[str]:
    entries = results.get("directions", [])
    lines = ["## Does the paper's direction hold here?", ""]
    if not entries:
        return lines + ["_No claims checked._", ""]
    held = sum(1 for d in entries if d.get("holds") is True)
    lines += [f"{held} of {len(entries)} hold.", ""]
    for d in entries:
        verdict = {True: "holds", False: "does not hold"}.get(d.get("holds"), "undetermined")
        lines.append(f"- **{verdict}**: {d.get('claim', '?')}. {d.get('evidence', '')}".rstrip())
    return lines + [""]


def _figures_section() -> list[str]:
    return ["## Plots", "",
            "![Downstream NE per eval day](ne_per_day.png)", "",
            "![Feature importance](feature_importance.png)", ""]


def render_markdown(results: Mapping[str, Any]) -> str:
    """``report.md``'s text for ``results``."""
    parts = (_header(results) + _how_to_read() + _directions(results) + _table1(results) + _table2(results)
             + _table3(results) + _table4(results) + _figures_section())
    return "\n".join(parts).rstrip() + "\n"


# -------------------------------------------------------------------------------------------- metrics, csv

def build_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers, nested one level per table (``dvc metrics show`` flattens them)."""
    t1 = {r["model"]: {"ne_without": r.get("ne_without"), "ne_with": r.get("ne_with"),
                       "ne_diff_pct": r.get("ne_diff_pct"), "fi_rank": r.get("fi_rank"),
                       "n_features": r.get("n_features")} for r in results.get("table1", [])}
    t2 = {}
    for r in results.get("table2", []):
        entry = {"ne_diff_pct": r.get("ne_diff_pct"), "coverage": r.get("coverage"),
                 "fallback_rate": r.get("fallback_rate")}
        entry.update({f"ne_diff_pct_{m}": v for m, v in sorted((r.get("per_model") or {}).items())})
        t2[r["mode"]] = entry
    t3: dict[str, dict[str, Any]] = {}
    for r in results.get("table3", []):
        e = t3.setdefault(f"embedding_{r['embedding']}", {})
        e[f"k{r['pooling']}_cosine"] = r.get("cosine")
        e[f"k{r['pooling']}_l2_change"] = r.get("l2_change")
    t4 = {r["setting"]: {"train_ne_diff_pct": r.get("train_ne_diff_pct"),
                         "eval_ne_diff_pct": r.get("eval_ne_diff_pct")} for r in results.get("table4", [])}
    dirs = results.get("directions", [])
    return {"dataset": results.get("dataset"), "wall_seconds": results.get("wall_seconds"),
            "table1": t1, "table2": t2, "table3": t3, "table4": t4,
            "directions_held": sum(1 for d in dirs if d.get("holds") is True), "directions_total": len(dirs)}


def daily_means(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Downstream NE per (eval day, mode, model), mean over seeds, sorted; all days when none is an eval day."""
    eval_days = set(results.get("eval_days") or [])
    daily = results.get("daily", [])
    if eval_days and any(r["ds"] in eval_days for r in daily):
        daily = [r for r in daily if r["ds"] in eval_days]
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in daily:
        if r.get("ne") is not None:
            groups.setdefault((r["ds"], r["mode"], r["model"]), []).append(float(r["ne"]))
    return [{"ds": ds, "mode": mode, "model": model, "ne": _mean(v)}
            for (ds, mode, model), v in sorted(groups.items())]


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


def _plot_ne_per_day(results: Mapping[str, Any], means: list[dict[str, Any]], path: Path) -> Path:
    models = [m for m in _models(results) if any(r["model"] == m for r in means)]
    fig, axes = _new_figure(len(models))
    fig.suptitle("Downstream NE per eval day, by serving mode (mean over seeds)")
    if not models:
        _no_data(axes[0], "daily NE")
    days = sorted({r["ds"] for r in means})
    x_of = {ds: i for i, ds in enumerate(days)}
    for ax, model in zip(axes, models):
        rows = [r for r in means if r["model"] == model]
        modes = sorted({r["mode"] for r in rows}, key=lambda m: (m != "none", _mode_rank(m)))
        for mode in modes:
            pts = [(x_of[r["ds"]], r["ne"]) for r in rows if r["mode"] == mode]
            style = dict(color="black", linestyle="--", marker="x") if mode == "none" else dict(marker="o")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=MODE_NAMES.get(mode, mode), **style)
        ax.set_title(model)
        ax.set_xlabel("eval day")
        ax.set_ylabel("NE (lower is better)")
        ax.set_xticks(range(len(days)), days, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    if models:  # every panel has the same modes: one legend, outside, so no line is hidden
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="serving mode")
    return _save_png(fig, path)


def _plot_shift(results: Mapping[str, Any], path: Path) -> Path:
    rows = sorted(results.get("table3", []), key=lambda r: (r["embedding"], r["pooling"]))
    fig, (ax_cos, ax_l2) = _new_figure(2)
    fig.suptitle("Embedding shift between consecutive days vs average-pooling depth (Table 3)")
    embeddings = sorted({r["embedding"] for r in rows})
    colors = {e: f"C{i}" for i, e in enumerate(embeddings)}
    for e in embeddings:
        mine = [r for r in rows if r["embedding"] == e]
        ks = [r["pooling"] for r in mine]
        ax_cos.plot(ks, [r["cosine"] for r in mine], marker="o", color=colors[e], label=f"embedding {e}")
        ax_l2.plot(ks, [100.0 * r["l2_change"] for r in mine], marker="o", color=colors[e], label=f"embedding {e}")
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
            ax.legend(fontsize=8)
        else:
            _no_data(ax, "Table 3 rows")
    return _save_png(fig, path)


def _importance_means(results: Mapping[str, Any]) -> dict[str, list[tuple[str, str, float, float]]]:
    """Per model: ``(feature, kind, mean NE increase, mean reported std)``, most important first."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results.get("importance", []):
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
    rows = sorted(results.get("table2", []), key=lambda r: _mode_rank(r["mode"]))
    rows = [r for r in rows if r.get("ne_diff_pct") is not None]
    fig, (ax, ax_paper) = _new_figure(2, width_per_panel=4.5)
    fig.suptitle("NE diff (%) per serving mode (Table 2; lower is better)")
    labels = [MODE_NAMES.get(r["mode"], r["mode"]) for r in rows]
    values = [float(r["ne_diff_pct"]) for r in rows]
    # Error bars only where there is a CI (none with a single seed): a zero-length bar would read as certainty.
    ci_x, ci_y, lo_err, hi_err = [], [], [], []
    for i, (r, v) in enumerate(zip(rows, values)):
        ci = r.get("ne_diff_ci")
        if ci and len(ci) == 2 and None not in ci:
            ci_x.append(i)
            ci_y.append(v)
            lo_err.append(max(v - float(ci[0]), 0.0))
            hi_err.append(max(float(ci[1]) - v, 0.0))
    if rows:
        ax.bar(range(len(rows)), values, color="C0", label="here")
        if ci_x:
            ax.errorbar(ci_x, ci_y, yerr=[lo_err, hi_err], fmt="none", ecolor="black", capsize=4,
                        label="CI across seeds")
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "Table 2 rows")
    ax.set_title(f"here ({results.get('dataset', '?')})")
    paper = [p for p in PAPER["table2"] if p["mode"] != "none"]
    ax_paper.bar(range(len(paper)), [p["ne_diff_pct"] for p in paper], color="C1", label="paper")
    ax_paper.set_xticks(range(len(paper)), [MODE_NAMES[p["mode"]] for p in paper], rotation=20, ha="right")
    ax_paper.set_title("paper (Table 2)")
    ax_paper.legend(fontsize=8)
    for a in (ax, ax_paper):
        a.axhline(0.0, color="black", linewidth=0.6)
        a.set_xlabel("serving mode")
        a.set_ylabel("NE diff vs no SUM (%)")
        a.grid(axis="y", alpha=0.3)
    return _save_png(fig, path)


# ------------------------------------------------------------------------------------------------------ API

def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Writes the study's report, plots, metrics and plot data into ``out_dir``.

    Args:
        results: The study's results (the schema in ``sum_pipeline/study.py``; absent tables are
            reported as not measured, null CIs as bare values).
        out_dir: The report folder (created if missing); files already there are replaced.

    Returns:
        Every file written, by its path relative to ``out_dir`` (``"report.md"``, ``"plots/ne_per_day.csv"``, ...).
    """
    import matplotlib
    import matplotlib.style

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def put(name: str, path: Path) -> None:
        written[name] = path

    means = daily_means(results)
    # The default style, whatever the user's matplotlibrc says: the same results give the same pixels.
    with matplotlib.style.context("default"), matplotlib.rc_context({"svg.hashsalt": "sum-study"}):
        put("ne_per_day.png", _plot_ne_per_day(results, means, out_dir / "ne_per_day.png"))
        put("shift_vs_pooling.png", _plot_shift(results, out_dir / "shift_vs_pooling.png"))
        put("feature_importance.png", _plot_importance(results, out_dir / "feature_importance.png"))
        put("serving_modes.png", _plot_serving_modes(results, out_dir / "serving_modes.png"))

    put("plots/ne_per_day.csv", _write_text(out_dir / "plots" / "ne_per_day.csv",
                                            _csv_text(("ds", "mode", "model", "ne"), means)))
    shift_rows = sorted(results.get("table3", []), key=lambda r: (r["pooling"], r["embedding"]))
    put("plots/shift_vs_pooling.csv", _write_text(out_dir / "plots" / "shift_vs_pooling.csv",
                                                  _csv_text(("pooling", "embedding", "cosine", "l2_change"), shift_rows)))
    put("metrics.json", write_json(out_dir / "metrics.json", build_metrics(results)))
    put("results.json", write_json(out_dir / "results.json", results))
    put("report.md", _write_text(out_dir / "report.md", render_markdown(results)))
    return written
