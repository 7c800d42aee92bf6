"""``sumctl soak``'s schedule (soak.plan): deterministic, two normal days first, faults and corruptions cycled."""

from __future__ import annotations

from sum_pipeline.soak import plan


def test_the_schedule_starts_normal_and_cycles_faults_and_corruptions():
    days = plan(12, "2026-01-30", ("reinit", "nan"), ("a", "b"), fault_every=5, corrupt_every=7)
    assert [d[0] for d in days][:3] == ["2026-01-30", "2026-01-31", "2026-02-01"]  # dates cross the month
    assert len({d[0] for d in days}) == 12
    assert [d[1] for d in days[:2]] == ["normal", "normal"]  # the gate needs a production to compare with
    assert [(i, d[2]) for i, d in enumerate(days) if d[1] == "fault"] == [(2, "reinit"), (7, "nan")]
    assert [(i, d[2]) for i, d in enumerate(days) if d[1] == "corrupt"] == [(3, "a"), (10, "b")]
    assert plan(12, "2026-01-30", ("reinit", "nan"), ("a", "b")) == days  # the same schedule every time


def test_a_fault_day_wins_over_a_corruption_on_the_same_day():
    days = plan(10, "2026-01-01", ("reinit",), ("a",), fault_every=1, corrupt_every=1)
    assert [d[1] for d in days] == ["normal", "normal"] + ["fault"] * 8


def test_no_kinds_means_every_day_normal():
    assert {d[1] for d in plan(9, "2026-01-01", (), ())} == {"normal"}
