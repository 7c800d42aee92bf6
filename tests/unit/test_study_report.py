"""The study's report writer: the tables with their verdict words, the paper's numbers beside ours, the choices and
the runtime, every PNG written, the same bytes twice."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from sum_pipeline.study_report import PAPER, write_report
from sum_pipeline.study_stats import tables

DAYS = [f"2026-01-{d:02d}" for d in range(1, 7)]
EVAL_DAYS = DAYS[-2:]
SEEDS = [7, 8, 9, 10]
MODELS = ("click", "conversion", "inbox")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = ("contrasts.png", "serving_modes.png", "shift_vs_pooling.png", "ne_per_day.png", "feature_importance.png",
        "norms_per_day.png")
EXPECTED_FILES = set(PNGS) | {"report.md", "metrics.json", "results.json", "plots/ne_per_day.csv",
                              "plots/shift_vs_pooling.csv"}
#: Per seed % NE diff vs no SUM. Chosen so that the verdicts are known: async beats no SUM in every seed (holds),
#: async vs offline is wholly positive (the chain does not hold), realtime vs async straddles zero (undetermined).
DIFFS = {
    "frozen": [-0.5, -0.6, -0.4, -0.5],
    "offline_raw": [-0.8, -0.9, -0.7, -0.8],
    "offline": [-2.0, -2.1, -1.9, -2.0],
    "async": [-1.0, -1.1, -0.9, -1.05],
    "realtime": [-1.2, -0.9, -1.1, -0.85],
}


def fake_results() -> dict:
    """Four seeds, two windows, all impressions and returning users, both pool units, every key of the schema."""
    measurements = []
    for i, seed in enumerate(SEEDS):
        for j, model in enumerate(MODELS):
            for subset in ("all", "returning"):
                for window in ("eval", "early"):
                    ne0 = 0.9 + 0.01 * j + 0.002 * i
                    common = {"seed": seed, "model": model, "window": window, "subset": subset}
                    measurements.append({**common, "arm": "none", "pool_unit": None, "ne": ne0, "n": 800})
                    for arm, diffs in DIFFS.items():
                        for unit in (("snapshot", "write") if arm in ("async", "realtime") else (None,)):
                            shift = 0.2 if unit == "write" else 0.0  # pooling over writes loses part of the gain
                            measurements.append({**common, "arm": arm, "pool_unit": unit, "n": 800, "coverage": 0.95,
                                                 "ne": ne0 * (1 + (diffs[i] + shift) / 100)})
    # click's rank varies from seed to seed (its interval straddles the paper's top 4: undetermined), inbox's does not.
    fi_rank = [{"seed": s, "model": m, "rank": {"click": (1, 7, 2, 6)[i], "conversion": 3, "inbox": 2}[m],
                "n_features": 9} for i, s in enumerate(SEEDS) for m in MODELS]
    shift = [{"seed": s, "embedding": e, "pooling": k, "part": part, "cosine": 0.7 + 0.08 * k + 0.002 * i,
              "l2_change": 0.3 / k + 0.001 * i}
             for i, s in enumerate(SEEDS) for e in (0, 1) for k in (1, 2, 3) for part in ("total", "snapshot")]
    norms = [{"seed": s, "ds": ds, "embedding": e, "mean_l2": 1.0 + 0.1 * d, "warmup": d < 2} for s in SEEDS
             for d, ds in enumerate(DAYS) for e in (0, 1)]
    daily = [{"arm": arm, "pool_unit": unit, "model": m, "seed": s, "ds": ds, "ne": 0.95 - 0.001 * d}
             for arm, unit in (("none", None), ("async", "snapshot"), ("async", "write")) for m in MODELS
             for s in SEEDS for d, ds in enumerate(DAYS[1:])]
    importance = [{"model": m, "seed": s, "feature": f, "kind": kind, "ne_increase": 0.02 / r, "ne_increase_std": 0.001,
                   "rank": r} for m in MODELS for s in SEEDS
                  for r, (f, kind) in enumerate((("sum_embedding_0", "sum_embedding"), ("ad_quality", "dense")), 1)]
    choices = {"frozen_staleness": "day-7 warm-up snapshot, kept for the window", "offline_staleness_days": 2,
               "realtime_fallback_rate": 0.1, "warm_up_days": 7, "pool_units": ["snapshot", "write"],
               "downstream_features": {"click": "2 of 8 user dense features, 1 of 3 id lists",
                                       "conversion": "4 of 8 user dense features",
                                       "inbox": "1 of 8 user dense features"},
               "staleness": {"frozen": "warm-up snapshot", "offline": "2 days"}}
    # click's baseline sees the most of the user, inbox's the least; two worlds each.
    user_signal = [{"model": m, "world": w, "interest_r2": r2 + 0.01 * w, "click_propensity_r2": r2 / 2}
                   for w in (0, 1) for m, r2 in (("click", 0.56), ("conversion", 0.40), ("inbox", 0.17),
                                                 ("SUM user model", 0.77))]
    return {"dataset": "simulated", "days": DAYS, "eval_days": EVAL_DAYS, "seeds": SEEDS, "wall_seconds": 754.3,
            "stage_seconds": {"upstream": 300.0, "replay": 54.0, "downstream": 400.0},
            "upstream": {"preset": "compact", "num_embeddings": 2, "embedding_dim": 96},
            "measurements": measurements, "fi_rank": fi_rank, "shift": shift, "norms": norms, "choices": choices,
            "daily": daily, "importance": importance, "user_signal": user_signal}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, dict[str, Path]]:
    results = fake_results()
    written = write_report(copy.deepcopy(results), tmp_path_factory.mktemp("study"))
    return results, written


def _lines(written: dict[str, Path]) -> list[str]:
    return written["report.md"].read_text().splitlines()


def _row(lines: list[str], *cells: str) -> str:
    """The first table row that contains every one of ``cells``."""
    return next(ln for ln in lines if ln.startswith("|") and all(c in ln for c in cells))


def test_every_file_is_written_and_non_empty(report):
    _, written = report
    assert set(written) == EXPECTED_FILES
    for name, path in written.items():
        assert path.is_file() and path.stat().st_size > 0, name


def test_pngs_are_valid_images(report):
    import matplotlib.image

    _, written = report
    for name in PNGS:
        assert written[name].read_bytes()[:8] == PNG_MAGIC, name
        image = matplotlib.image.imread(written[name])
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400, (name, image.shape)


def test_table1_has_paired_contrasts_with_their_verdicts_and_the_papers_numbers(report):
    _, written = report
    lines = _lines(written)
    text = "\n".join(lines)
    assert "## Table 1" in text and "pool unit: snapshot" in text
    click = _row(lines, "| click | 800 |")
    assert "-1.013 [" in click and "| **holds** |" in click and "| 4 of 4 |" in click
    assert "CTR, Mobile feed | -0.19 | 2" in click
    assert "4.0 [" in click and "2.0 [2.0, 2.0] of 9" in _row(lines, "| inbox | 800 |")
    assert "**Subset: returning users' impressions" in text  # the subset gets its own rows
    assert "-0.35" in text and "Messenger inbox" in text


def test_table2_is_reported_under_both_pool_units_with_the_between_mode_contrasts(report):
    _, written = report
    lines = _lines(written)
    text = "\n".join(lines)
    for unit in ("snapshot", "write"):
        assert f"**Pool unit: {unit}; subset: all impressions**" in text
    assert "Online Async Serving" in text and "-0.126" in text and "-0.141" in text and "-0.034" in text
    frozen = _row(lines, "Baseline + SUM (Frozen)")
    assert "warm-up snapshot" in frozen and "| **holds** |" in frozen and "95.0%" in frozen
    # async vs offline: about +1 % in every seed, the paper's side is below 0.
    assert "| **does not hold** |" in _row(lines, "| online async vs offline batch |")
    assert "| **undetermined** |" in _row(lines, "| online realtime vs online async |")
    assert "Share of realtime's NE gain that async keeps" in text and "Fieller" in text


def test_table3_gives_intervals_the_split_and_the_by_construction_note(report):
    _, written = report
    lines = _lines(written)
    text = "\n".join(lines)
    assert "| Embedding 0 | None | 0.783 [" in text and "| 0.87 | 13 |" in text
    assert "| snapshot |" in text
    assert "expected by construction" in text
    assert "| **holds** |" in _row(lines, "| Embedding 0 | 3 − 1 |")


def test_table4_names_the_early_window_and_never_calls_it_train_ne(report):
    _, written = report
    lines = _lines(written)
    text = "\n".join(lines)
    assert "Early-window NE diff (%)" in text and "Eval-window NE diff (%)" in text
    assert "Train NE" not in text and "train NE (%)" not in text
    ap = _row(lines, "AP effect: w/ AP vs w/o AP")
    assert ap.count("**holds**") == 2 and "-0.113 pp" in ap
    assert "-0.109" in text and "-0.127" in text and "-0.014" in text


def test_directions_state_their_verdicts(report):
    results, written = report
    lines = _lines(written)
    expected = {d["claim"]: d["verdict"] for d in tables(results)["directions"]}
    assert {"holds", "does not hold", "undetermined"} <= set(expected.values())
    for claim, v in expected.items():
        [line] = [ln for ln in lines if claim in ln]
        assert line.startswith(f"- **{v}**: ")


def test_choices_runtime_and_what_the_baseline_sees(report):
    _, written = report
    text = written["report.md"].read_text()
    assert "## Choices" in text and "- **warm up days**: 7" in text and "- **pool units**: snapshot, write" in text
    assert "- Runtime: 754.3 s (12.6 min) wall for 4 seeds on `simulated`" in text
    assert "stage time summed over seeds: downstream 400 s, replay 54 s, upstream 300 s" in text
    assert "| click | 2 of 8 user dense features, 1 of 3 id lists |" in text
    assert "not how good SUM is" in text
    for png in ("contrasts.png", "serving_modes.png", "shift_vs_pooling.png", "ne_per_day.png",
                "feature_importance.png", "norms_per_day.png"):
        assert f"]({png})" in text  # relative links


def test_sums_gain_is_shown_against_the_user_signal_its_baseline_has(report):
    _, written = report
    lines = _lines(written)
    assert "### SUM's gain against the user signal each baseline already has" in lines
    rows = [ln for ln in lines if ln.startswith("| ") and any(m in ln for m in ("click |", "conversion |", "inbox |",
                                                                                  "SUM user model |"))
            and ("0.1" in ln or "0.4" in ln or "0.5" in ln or "0.7" in ln)]
    # ordered by how much of the user the features explain (mean over worlds), SUM's own features last
    order = [ln.split("|")[1].strip() for ln in rows if ln.split("|")[2].strip()[:1] == "0"]
    assert order == ["inbox", "conversion", "click", "SUM user model"]
    assert "0.565" in _row(lines, "| click |", "0.565")  # interest R^2: mean of 0.56 and 0.57
    assert "the upstream's own features" in _row(lines, "SUM user model")


def test_metrics_and_results_carry_the_contrasts(report):
    results, written = report
    metrics = json.loads(written["metrics.json"].read_text())
    derived = tables(results)
    click = next(r for r in derived["table1"] if r["model"] == "click" and r["subset"] == "all")
    assert metrics["table1"]["click"]["ne_diff_pct"]["mean"] == pytest.approx(click["ne_diff"]["mean"])
    assert metrics["table2"]["async_write"]["ne_diff_pct"]["verdict"] == "holds"
    assert metrics["contrasts"]["async_vs_offline_snapshot"]["verdict"] == "does not hold"
    assert metrics["seeds"] == 4 and sum(metrics["directions"].values()) == len(derived["directions"])
    saved = json.loads(written["results.json"].read_text())
    assert saved["measurements"] == results["measurements"] and saved["choices"] == results["choices"]
    assert saved["directions"] == json.loads(json.dumps(derived["directions"]))


def test_plot_data(report):
    results, written = report
    with written["plots/ne_per_day.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert {r["ds"] for r in rows} == set(EVAL_DAYS)
    assert {r["mode"] for r in rows} == {"none", "async (snapshot)", "async (write)"}
    with written["plots/shift_vs_pooling.csv"].open() as f:
        shift = list(csv.DictReader(f))
    assert list(shift[0]) == ["pooling", "embedding", "cosine", "l2_change"] and len(shift) == 6


def test_the_same_results_reloaded_give_the_same_files(report, tmp_path):
    _, first = report
    # results.json holds the results with their derived tables: written again, every byte is the same.
    second = write_report(json.loads(first["results.json"].read_text()), tmp_path)
    for name in ("report.md", "metrics.json", "results.json", "plots/ne_per_day.csv", *PNGS):
        assert first[name].read_bytes() == second[name].read_bytes(), name


def test_single_seed_is_not_measurable_and_missing_parts_do_not_crash(tmp_path):
    results = fake_results()
    results["seeds"] = SEEDS[:1]
    results["measurements"] = [m for m in results["measurements"] if m["seed"] == SEEDS[0]]
    for key in ("norms", "importance", "daily", "shift", "fi_rank"):
        results.pop(key)
    written = write_report(results, tmp_path)
    assert "norms_per_day.png" not in written
    text = written["report.md"].read_text()
    verdict_cells = [ln for ln in text.splitlines() if ln.startswith("|") and "**" in ln]
    assert verdict_cells and all("**not measurable**" in ln for ln in verdict_cells)
    verdicts = text.split("## Does the paper's direction hold here?")[1].split("## Table 1")[0]
    bullets = [ln for ln in verdicts.splitlines() if ln.startswith("- ")]
    assert bullets and all(ln.startswith("- **not measurable**: ") for ln in bullets)
    assert "| click | 800 | 0.9000 | 0.8910 | -1.000 | **not measurable** | — | 1 of 1 |" in text
    assert "## Table 3" in text and "_Not measured._" in text


def test_paper_constant_matches_the_paper():
    assert len(PAPER["table1"]) == 12
    inbox = next(r for r in PAPER["table1"] if r["domain"] == "Messenger inbox")
    assert (inbox["ne_diff_pct"], inbox["fi"]) == (-0.35, 1)
    assert {r["mode"]: r["ne_diff_pct"] for r in PAPER["table2"]} == {
        "none": 0.0, "frozen": -0.034, "offline": -0.094, "realtime": -0.141, "async": -0.126}
    assert [(r["cosine"], r["l2_change_pct"]) for r in PAPER["table3"]] == [(0.87, 13), (0.97, 5), (0.97, 5), (0.99, 2)]
    ap = {r["setting"]: (r["train_ne_diff_pct"], r["eval_ne_diff_pct"]) for r in PAPER["table4"]}
    assert ap == {"baseline": (0, 0), "no_ap": (-0.081, -0.014), "ap3": (-0.109, -0.127)}


def test_a_world_every_seed_shares_is_stated_once_and_distinct_worlds_per_seed_in_seed_order():
    from sum_pipeline.study_report import _world

    fixed = {str(s): "fixed data (the same days for every seed)" for s in (7, 10, 8, 9)}
    assert _world(fixed) == "fixed data (the same days for every seed), every seed"
    drawn = {"10": "simulator.seed = 3", "9": "simulator.seed = 2", "8": "simulator.seed = 1"}
    assert _world(drawn) == "seed 8: simulator.seed = 1; seed 9: simulator.seed = 2; seed 10: simulator.seed = 3"
