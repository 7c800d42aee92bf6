"""A short soak through the real DAG and the real ``sum_downstream`` DAG (the 30-day one is `make soak`), in a
workspace of its own with ``gate.mode: both``: a shifted candidate is never promoted, normal ones are, a corrupted
partition is caught and its fixed redelivery promoted, and the drills separate the proxy checks from the consumer
check. As deployed, every promotion is followed by ``sum_downstream`` (the soak runs it), so the consumers retrain on
each promoted day:

* day 1: no production yet, so no consumer to ask (a verdict line says so); promoted;
* day 2: the models saved on day 1 never saw an embedding (nothing was served before day 1's batch): each consumer
  is "not measurable", said in the verdict, and the proxies decide;
* day 3 arrives corrupted (``label_rate_collapse``, a trailing check: two validated days before it): caught, then
  fixed and rerun; the models saved on day 2 were trained with what serving handed out, so check_consumers scores
  the consumer holdout (users the candidate never trained on) with what serving hands out now and after the
  promotion; promoted;
* ``consumer_aimed_offset`` (version skew aimed at the consumers' projections, no longer than a normal day's
  change): the proxies pass it, the consumers hold it;
* ``reinit`` (re-initialised weights, the README's gate drill): the proxies hold it, the consumers are unharmed
  (they rely little on the embeddings after a few days, and pooling gives the candidate a third of what is served);
* ``explode_lr`` held.

``scale`` (embeddings 20x as large, held by the consumers and the L2 check) would assert nothing the aimed offset
does not, and is left to the 30-day soak.

The deployed stack (tests/integration/test_deployed_stack.py) holds a ``scale`` candidate by its consumers and has
it approved from Required Actions, and holds a NaN one until its approval times out; ``perturb`` is in the 30-day
soak's cycle.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from params_env import params_in_force

pytestmark = pytest.mark.slow

SCHEDULE = [
    ("2026-01-01", "normal", ""),
    ("2026-01-02", "normal", ""),
    ("2026-01-03", "corrupt", "label_rate_collapse"),  # its fixed rerun is the first day the consumers measure
    ("2026-01-04", "fault", "consumer_aimed_offset"),
    ("2026-01-05", "fault", "reinit"),  # the README's gate drill (`sumctl run --fault 2026-01-03=reinit`)
    ("2026-01-06", "fault", "explode_lr"),
]
DAYS = [ds for ds, _, _ in SCHEDULE]
FAULT_DAY = {detail: ds for ds, kind, detail in SCHEDULE if kind == "fault"}


@pytest.fixture(scope="module")
def soak_params(session_dir: Path):
    raw = yaml.safe_load(Path(os.environ["SUM_PARAMS"]).read_text())
    raw["paths"] = {"workspace": "soak-workspace", "dvc_remote": "soak-remote"}
    raw["gate"]["mode"] = "both"
    with params_in_force(raw, session_dir / "params-soak.yaml") as params:
        yield params


@pytest.fixture(scope="module")
def soak(soak_params, airflow_db, ray_serve):
    """The report and every daily DAG run's result by date (``"<ds> rerun"`` for the fixed date's rerun)."""
    from sum_pipeline.soak import run_soak
    from validation.corruptions import failing_kinds

    assert "label_rate_collapse" in failing_kinds()
    runs = {}
    report = run_soak(SCHEDULE, on_run=runs.__setitem__)
    return report, runs


@pytest.fixture(scope="module")
def report(soak):
    return soak[0]


@pytest.fixture(scope="module")
def runs(soak):
    return soak[1]


def _verdict(run) -> dict:
    return run.xcoms["shift_gate.verdict"]


def _consumer(run, name: str = "click") -> dict:
    return next(c for c in _verdict(run)["consumers"] if c["consumer"] == name)


def _outcomes(run, family: str) -> dict[str, str]:
    from validation.gate import check_family

    return {c["name"]: c["outcome"] for c in _verdict(run)["checks"] if check_family(c["name"]) == family}


def test_no_shifted_candidate_is_promoted(report):
    shifted = report.shifted
    assert [d.detail for d in shifted] == ["consumer_aimed_offset", "reinit", "explode_lr"]
    for day in shifted:
        assert day.state == "success", day  # held is a verdict, not a failure
        assert day.verdict == "held" and not day.promoted and day.downstream_state is None, day


def test_normal_candidates_are_promoted_and_their_consumers_retrained(report):
    summary = report.summary()
    assert summary["normal_candidates"] == 3  # two normal days + the fixed redelivery of the corrupted one
    assert summary["normal_promotion_rate"] == 1.0
    promoted = [d for d in report.days if d.promoted or d.rerun_promoted]
    assert [d.ds for d in promoted] == DAYS[:3]
    assert all(d.downstream_state == "success" for d in promoted), promoted


def test_corrupted_partition_is_caught_then_fixed(report):
    (day,) = report.corrupted
    assert day.caught and day.state == "failed" and day.families == {}  # caught before any candidate
    assert day.rerun_state == "success" and day.rerun_promoted
    assert report.passed()


def test_the_first_days_have_no_consumer_to_ask_and_say_so(runs):
    first, second = (runs[ds] for ds in DAYS[:2])
    assert first.xcoms["check_consumers"]["consumers"] == []
    assert "no production snapshot yet" in first.xcoms["check_consumers"]["note"]
    assert any("consumer check: no production snapshot yet" in r for r in _verdict(first)["reasons"])
    table = second.xcoms["check_consumers"]["consumers"]
    assert table and all(c["outcome"] == "not_measurable" and "no embedding had been served" in c["why"]
                         for c in table)
    assert any("the proxies decide (gate.mode: both)" in r for r in _verdict(second)["reasons"])
    for run in (first, second):
        assert _verdict(run)["verdict"] == "blessed", _verdict(run)["reasons"]


def test_a_normal_day_is_scored_by_its_consumers_and_promoted(runs, soak_params):
    run = runs[f"{DAYS[2]} rerun"]
    assert run.state == "success", run.task_states
    checked = run.xcoms["check_consumers"]
    assert checked["snapshot_id"] == f"sum-{DAYS[2]}" and checked["rows"] > 0 and checked["users"] > 0
    by_name = {c["consumer"]: c for c in checked["consumers"]}
    assert set(by_name) == set(soak_params.downstream.models)
    click = by_name["click"]
    assert click["outcome"] == "pass", click
    assert click["model_day"] == DAYS[1] and click["change_ci"][0] <= click["change_pct"] <= click["change_ci"][1]
    assert click["ne"]["now"] > 0 and click["ne"]["after"] > 0 and click["ne"]["without"] > 0
    assert 0 <= click["worse_share"] <= 1
    verdict = _verdict(run)
    assert verdict["verdict"] == "blessed", verdict["reasons"]
    assert [c["consumer"] for c in verdict["consumers"]] == [c["consumer"] for c in checked["consumers"]]
    assert any(r.startswith("consumer click: NE ") and "after vs now" in r for r in verdict["reasons"])
    table = run.xcoms["shift_gate.verdict_table"]
    assert "| consumer | NE now | NE after |" in table and "| click |" in table
    assert run.xcoms["verify_serving"]["served_snapshot_id"] == f"sum-{DAYS[2]}"


def test_the_consumer_holdout_users_are_not_in_the_candidate_s_training(runs, soak_params):
    from sum_pipeline.tasks import training_frame
    from sum_platform.context import context
    from sum_platform.partitions import read_partition
    from validation.consumers import consumer_users

    ctx = context()
    train, _, _ = training_frame(DAYS[2], ctx)
    events = read_partition(ctx.ws.events_dir(DAYS[2]))
    unseen = set(events.loc[consumer_users(events["user_id"].to_numpy(), 0.1), "user_id"])
    assert unseen and not unseen & set(train["user_id"])


def test_an_aimed_offset_passes_the_proxies_and_is_held_by_the_consumers(runs):
    run = runs[FAULT_DAY["consumer_aimed_offset"]]
    assert run.state == "success", run.task_states
    verdict = _verdict(run)
    assert verdict["verdict"] == "held"
    proxies = _outcomes(run, "proxies")
    assert any(name.endswith(".pooled_relative_l2_change") for name in proxies)  # the shift was enforced
    assert set(proxies.values()) == {"pass"} and set(_outcomes(run, "sanity").values()) == {"pass"}, proxies
    click = _consumer(run)
    assert click["outcome"] == "fail" and click["change_ci"][0] > 0, click
    assert click["model_day"] == DAYS[2]  # the consumers retrained on the last promoted day (sum_downstream)
    assert any(r.startswith("consumer click: NE +") and "consumer_max_ne_regression_pct" in r
               for r in verdict["reasons"])
    table = run.xcoms["shift_gate.verdict_table"]  # the table shows which check caught it
    failed = sum(c["outcome"] == "fail" for c in verdict["consumers"])
    assert table.count("| NO |") == 2 * failed  # each failed consumer's check row and table row, no other check
    assert "verify_serving" not in run.xcoms  # the held candidate never reached serving


def test_a_reinitialised_candidate_fails_the_proxies_while_its_consumers_are_unharmed(runs):
    run = runs[FAULT_DAY["reinit"]]
    proxies = _outcomes(run, "proxies")
    assert "fail" in proxies.values(), proxies
    consumers = _outcomes(run, "consumers")
    assert consumers and "fail" not in consumers.values(), _verdict(run)["consumers"]
    assert _verdict(run)["verdict"] == "held"


def test_the_summary_scores_proxies_and_consumers_side_by_side(report):
    from rich.console import Console

    from sum_pipeline.cli import _family_table

    summary = report.summary()
    families = summary["families"]
    assert list(families) == ["sanity", "proxies", "consumers"]
    # Three shifted candidates: the proxies passed the aimed offset, the consumers passed the re-initialised tower.
    assert families["proxies"]["shifted_judged"] == 3 and families["proxies"]["false_promotions"] == 1
    assert families["consumers"]["false_promotions"] >= 1
    assert families["proxies"]["false_holds"] == families["consumers"]["false_holds"] == 0
    # Days 1 and 2 have no consumer measurable: the consumers judged only the fixed redelivery of day 3.
    assert families["proxies"]["normal_judged"] == 3 and families["consumers"]["normal_judged"] == 1
    by_day = {d.detail: d.families for d in report.shifted}
    assert by_day["consumer_aimed_offset"] == {"sanity": "pass", "proxies": "pass", "consumers": "fail"}
    assert by_day["reinit"]["proxies"] == "fail" and by_day["reinit"]["consumers"] == "pass"
    # A diverged candidate embeds nobody: the finite checks hold it, and no consumer row can be scored.
    assert by_day["explode_lr"] == {"sanity": "fail", "proxies": "fail"}
    exploded = next(d for d in report.shifted if d.detail == "explode_lr")
    assert exploded.consumers and {c["outcome"] for c in exploded.consumers} == {"not_measurable"}
    console = Console(record=True, width=200)
    console.print(_family_table(summary))  # what `sumctl soak` prints
    text = console.export_text()
    for family, s in families.items():
        row = re.search(rf"{family}\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)", text)
        assert row and [int(v) for v in row.groups()] == [
            s["shifted_judged"], s["false_promotions"], s["normal_judged"], s["false_holds"]], text


def test_the_consumer_check_benchmark_measures_the_soak_s_first_measured_day(runs, soak_params, tmp_path):
    """benchmarks/consumer_check_bench.py's measurement on a day this soak ran (the fixed day 3, the first whose
    consumers are measured), instead of three days of its own: its split re-runs the task's library calls in this
    workspace and must give the task's own consumer table; the tables print and the plot is written."""
    from rich.console import Console

    from benchmarks import consumer_check_bench as bench
    from benchmarks.train_bench import matmul_peak

    result = runs[f"{DAYS[2]} rerun"]
    row = bench.day_row(DAYS[2], result, day_s=sum(bench._seconds(ti) for ti in result.task_instances.values()
                                                   if ti.get("start_date")))
    assert row["promoted"] and row["consumers"] and row["check_s"] > 0
    day = bench.measure_day(row, result)
    assert day["matches_task"], (day["consumers"], row["consumers"])
    assert 0 < day["share"] < 1 and day["added"] > day["share"]
    assert set(day["split"]) == set(bench.SPLIT) and all(s >= 0 for s in day["split"].values())
    assert len(day["per_snapshot_embed_s"]) == day["holdout"]["snapshots"] == 3
    assert day["floor"]["tower_forward_s"] > 0 and day["floor"]["downstream_forward_s"] > 0
    console = Console(record=True, width=160)
    bench.show([row], [day], matmul_peak(threads=1, seconds=0.1), tmp_path / "cc.png", console)
    assert "check_consumers adds" in console.export_text() and (tmp_path / "cc.png").stat().st_size > 10_000
