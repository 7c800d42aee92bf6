"""A short soak through the real DAG (the 30-day one is `make soak`): a shifted candidate is never
promoted, normal ones are, a corrupted partition is caught, and its fixed redelivery is promoted.

``reinit`` (re-initialised weights) is the README's gate drill. The other candidate faults go through the deployed stack (tests/integration/test_deployed_stack.py: a
perturbed candidate held then approved, a NaN one held until its approval times out)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCHEDULE = [
    ("2026-01-01", "normal", ""),
    ("2026-01-02", "fault", "explode_lr"),
    ("2026-01-03", "corrupt", "label_rate_collapse"),  # a trailing check: two validated days before it
    ("2026-01-04", "fault", "reinit"),  # the README's gate drill (`sumctl run --fault 2026-01-03=reinit`)
]


@pytest.fixture(scope="module")
def report(session_dir: Path, airflow_db, ray_serve):
    from sum_pipeline.soak import run_soak
    from validation.corruptions import failing_kinds

    assert "label_rate_collapse" in failing_kinds()
    old = os.environ.get("SUM_WORKSPACE")
    os.environ["SUM_WORKSPACE"] = str(session_dir / "soak-workspace")
    try:
        yield run_soak(SCHEDULE)
    finally:
        if old is not None:
            os.environ["SUM_WORKSPACE"] = old


def test_no_shifted_candidate_is_promoted(report):
    shifted = report.shifted
    assert [d.detail for d in shifted] == ["explode_lr", "reinit"]
    for day in shifted:
        assert day.state == "success", day  # held is a verdict, not a failure
        assert day.verdict == "held" and not day.promoted, day


def test_normal_candidates_are_promoted(report):
    summary = report.summary()
    assert summary["normal_candidates"] == 2  # the normal day + the fixed redelivery of the corrupted one
    assert summary["normal_promotion_rate"] == 1.0


def test_corrupted_partition_is_caught_then_fixed(report):
    (day,) = report.corrupted
    assert day.caught and day.state == "failed"
    assert day.rerun_state == "success" and day.rerun_promoted
    assert report.passed()
