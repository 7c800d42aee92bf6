"""The study's report writer: every file written, the paper's numbers beside ours, the same bytes twice."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from sum_pipeline.study_report import PAPER, write_report

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
MODELS = ("click", "conversion", "inbox")
MODES = ("none", "frozen", "offline", "realtime", "async")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_FILES = {"report.md", "metrics.json", "results.json", "ne_per_day.png", "shift_vs_pooling.png",
                  "feature_importance.png", "serving_modes.png", "plots/ne_per_day.csv", "plots/shift_vs_pooling.csv"}


def fake_results() -> dict:
    """Three days (one train, two eval), two seeds, every key of the study's schema."""
    seeds = [0, 1]
    table1 = []
    for i, model in enumerate(MODELS):
        table1.append({
            "model": model, "label": "conversion" if model == "conversion" else "click",
            "description": f"{model} model", "ne_without": 0.93 + 0.01 * i, "ne_with": 0.91 + 0.01 * i,
            "ne_diff_pct": -2.1 + 0.5 * i, "ne_diff_ci": [-2.5 + 0.5 * i, -1.7 + 0.5 * i],
            "fi_rank": 1.5 + i, "fi_rank_ci": [1.0 + i, 2.0 + i], "n_features": 7,
            "per_seed": [{"seed": s, "ne_without": 0.93, "ne_with": 0.91, "ne_diff_pct": -2.1 + 0.1 * s,
                          "fi_rank": 1 + s} for s in seeds],
        })
    table2 = [
        {"mode": "frozen", "staleness": "first snapshot", "ne_diff_pct": -0.5, "ne_diff_ci": [-0.7, -0.3],
         "per_model": {"click": -0.6, "conversion": -0.3, "inbox": -0.6}, "coverage": 0.99, "fallback_rate": None},
        {"mode": "offline", "staleness": "1 day", "ne_diff_pct": -1.0, "ne_diff_ci": None,  # a null CI
         "per_model": {"click": -1.2, "conversion": -0.6, "inbox": -1.2}, "coverage": 0.97, "fallback_rate": None},
        {"mode": "realtime", "staleness": "0 days", "ne_diff_pct": -1.4, "ne_diff_ci": [-1.6, -1.2],
         "per_model": {"click": -1.6, "conversion": -1.0, "inbox": -1.6}, "coverage": 1.0, "fallback_rate": 0.1},
        {"mode": "async", "staleness": "0 days (cached)", "ne_diff_pct": -1.3, "ne_diff_ci": [-1.5, -1.1],
         "per_model": {"click": -1.5, "conversion": -0.9, "inbox": -1.5}, "coverage": 0.95, "fallback_rate": None},
    ]
    table3 = [{"embedding": e, "pooling": k, "cosine": 0.8 + 0.02 * k + 0.05 * e, "l2_change": 0.2 / k}
              for e in (0, 1) for k in range(1, 6)]
    table4 = [
        {"setting": "no_ap", "train_ne_diff_pct": -0.08, "train_ne_diff_ci": [-0.1, -0.06],
         "eval_ne_diff_pct": -0.01, "eval_ne_diff_ci": None},
        {"setting": "ap3", "train_ne_diff_pct": -0.11, "train_ne_diff_ci": [-0.13, -0.09],
         "eval_ne_diff_pct": -0.12, "eval_ne_diff_ci": [-0.15, -0.09]},
    ]
    daily = [{"mode": mode, "model": model, "seed": s, "ds": ds, "ne": 0.95 - 0.01 * j - 0.001 * s + 0.002 * d}
             for j, mode in enumerate(MODES) for model in MODELS for s in seeds for d, ds in enumerate(DAYS)]
    importance = []
    for model in MODELS:
        feats = [("sum_embedding_0", "sum_embedding"), ("sum_embedding_1", "sum_embedding"),
                 ("ad_quality", "dense"), ("ad_category", "categorical")]
        for rank, (feature, kind) in enumerate(feats, start=1):
            importance.append({"model": model, "feature": feature, "kind": kind, "ne_increase": 0.02 / rank,
                               "ne_increase_std": 0.001, "rank": rank})
    directions = [
        {"claim": "SUM embeddings lower downstream NE (Table 1)", "holds": True,
         "evidence": "NE diff -2.1% [-2.5, -1.7] on click"},
        {"claim": "Async keeps most of realtime's gain (Table 2)", "holds": True, "evidence": "93% kept"},
        {"claim": "Average pooling lifts the eval gain (Table 4)", "holds": False,
         "evidence": "eval NE diff -0.01 without AP vs -0.12 with"},
    ]
    return {
        "dataset": "simulated", "days": DAYS, "train_days": DAYS[:1], "eval_days": DAYS[1:], "seeds": seeds,
        "wall_seconds": 123.4, "upstream": {"preset": "compact", "num_embeddings": 2, "embedding_dim": 96},
        "table1": table1, "table2": table2, "table3": table3, "table4": table4, "daily": daily,
        "importance": importance, "directions": directions,
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, dict[str, Path]]:
    results = fake_results()
    written = write_report(copy.deepcopy(results), tmp_path_factory.mktemp("study"))
    return results, written


def test_every_file_is_written_and_non_empty(report):
    _, written = report
    assert set(written) == EXPECTED_FILES
    for name, path in written.items():
        assert path.is_file() and path.stat().st_size > 0, name


def test_pngs_are_valid_images(report):
    import matplotlib.image

    _, written = report
    for name in ("ne_per_day.png", "shift_vs_pooling.png", "feature_importance.png", "serving_modes.png"):
        assert written[name].read_bytes()[:8] == PNG_MAGIC, name
        image = matplotlib.image.imread(written[name])
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400, (name, image.shape)


def test_report_has_the_four_tables_and_the_papers_numbers(report):
    _, written = report
    text = written["report.md"].read_text()
    for header in ("## Table 1", "## Table 2", "## Table 3", "## Table 4", "## Does the paper's direction hold here?"):
        assert header in text
    assert "Online Async Serving" in text and "-0.126" in text  # Table 2, async
    assert "-0.141" in text and "-0.034" in text and "-0.094" in text
    assert "| Embedding 0 | None | 0.820 | 20.0% | 0.87 | 13% |" in text  # Table 3, ours beside the paper's
    assert "-0.35" in text and "Messenger inbox" in text  # Table 1
    assert "-0.109" in text and "-0.127" in text and "-0.014" in text  # Table 4
    assert "-2.100 [-2.500, -1.700]" in text  # a CI
    assert "-1.000 |" in text  # offline's null CI: the bare value
    for png in ("ne_per_day.png", "shift_vs_pooling.png", "feature_importance.png", "serving_modes.png"):
        assert f"]({png})" in text  # relative links
    assert "simulated" in text and "123.4 s" in text


def test_each_direction_is_stated_as_it_came_out(report):
    results, written = report
    lines = written["report.md"].read_text().splitlines()
    for d in results["directions"]:
        [line] = [ln for ln in lines if d["claim"] in ln]
        verdict = "**holds**" if d["holds"] else "**does not hold**"
        assert line.startswith(f"- {verdict}") and d["evidence"] in line


def test_metrics_equal_the_input(report):
    results, written = report
    metrics = json.loads(written["metrics.json"].read_text())
    for r in results["table1"]:
        assert metrics["table1"][r["model"]]["ne_diff_pct"] == r["ne_diff_pct"]
        assert metrics["table1"][r["model"]]["fi_rank"] == r["fi_rank"]
    for r in results["table2"]:
        assert metrics["table2"][r["mode"]]["ne_diff_pct"] == r["ne_diff_pct"]
        assert metrics["table2"][r["mode"]]["fallback_rate"] == r["fallback_rate"]
    for r in results["table3"]:
        e = metrics["table3"][f"embedding_{r['embedding']}"]
        assert e[f"k{r['pooling']}_cosine"] == r["cosine"] and e[f"k{r['pooling']}_l2_change"] == r["l2_change"]
    for r in results["table4"]:
        assert metrics["table4"][r["setting"]]["eval_ne_diff_pct"] == r["eval_ne_diff_pct"]
    assert metrics["directions_held"] == 2 and metrics["directions_total"] == 3
    assert json.loads(written["results.json"].read_text()) == results


def test_plot_data_is_the_mean_over_seeds_on_eval_days(report):
    results, written = report
    with written["plots/ne_per_day.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(MODES) * len(MODELS) * len(results["eval_days"])
    assert {r["ds"] for r in rows} == set(results["eval_days"])
    row = next(r for r in rows if r["mode"] == "async" and r["model"] == "click")
    seeds = [d["ne"] for d in results["daily"] if (d["mode"], d["model"], d["ds"]) == ("async", "click", row["ds"])]
    assert float(row["ne"]) == pytest.approx(sum(seeds) / len(seeds))
    with written["plots/shift_vs_pooling.csv"].open() as f:
        shift = list(csv.DictReader(f))
    assert list(shift[0]) == ["pooling", "embedding", "cosine", "l2_change"] and len(shift) == 10


def test_same_results_give_the_same_files(report, tmp_path):
    results, first = report
    second = write_report(copy.deepcopy(results), tmp_path)
    for name in ("report.md", "metrics.json", "results.json", "plots/ne_per_day.csv", "serving_modes.png"):
        assert first[name].read_bytes() == second[name].read_bytes(), name


def test_single_seed_and_missing_tables_do_not_crash(tmp_path):
    results = fake_results()
    results["seeds"] = [0]
    for r in results["table1"]:
        r["ne_diff_ci"] = r["fi_rank_ci"] = None
    for r in results["table2"]:
        r["ne_diff_ci"] = None
    results["table4"] = []
    results["importance"] = []
    written = write_report(results, tmp_path)
    assert set(written) == EXPECTED_FILES
    text = written["report.md"].read_text()
    assert "| click | click | click model | 0.9300 | 0.9100 | -2.100 | 1.5 of 7 |" in text
    assert "## Table 4" in text and "_Not measured._" in text


def test_paper_constant_matches_the_paper():
    assert len(PAPER["table1"]) == 12
    inbox = next(r for r in PAPER["table1"] if r["domain"] == "Messenger inbox")
    assert (inbox["ne_diff_pct"], inbox["fi"]) == (-0.35, 1)
    assert {r["mode"]: r["ne_diff_pct"] for r in PAPER["table2"]} == {
        "none": 0.0, "frozen": -0.034, "offline": -0.094, "realtime": -0.141, "async": -0.126}
    assert [(r["cosine"], r["l2_change_pct"]) for r in PAPER["table3"]] == [(0.87, 13), (0.97, 5), (0.97, 5), (0.99, 2)]
    ap = {r["setting"]: (r["train_ne_diff_pct"], r["eval_ne_diff_pct"]) for r in PAPER["table4"]}
    assert ap == {"baseline": (0, 0), "no_ap": (-0.081, -0.014), "ap3": (-0.109, -0.127)}
