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


def test_each_check_family_is_scored_on_what_it_measured():
    from sum_pipeline.soak import SoakDay, SoakReport, family_outcomes

    def check(name, outcome, enforced=True):
        return {"name": name, "outcome": outcome, "passed": outcome == "pass", "enforced": enforced}

    verdict = {"checks": [check("weights_finite", "pass"), check("embedding_0.cosine_across_users", "pass"),
                          check("ne.click", "pass"), check("embedding_0.mean_cosine", "pass"),
                          check("consumer.click.ne_change_pct", "fail"),
                          check("consumer.inbox.ne_change_pct", "not_measurable")]}
    assert family_outcomes(verdict) == {"sanity": "pass", "proxies": "pass", "consumers": "fail"}
    assert family_outcomes({"checks": [check("consumer.click.ne_change_pct", "not_measurable")]}) == {}
    assert family_outcomes({}) == {}  # no verdict (a caught partition)
    report = SoakReport([
        SoakDay("d1", "normal", families={"sanity": "pass", "proxies": "pass"}),
        SoakDay("d2", "normal", families={"sanity": "pass", "proxies": "fail", "consumers": "pass"}),
        SoakDay("d3", "fault", "a", families={"sanity": "pass", "proxies": "pass", "consumers": "fail"}),
        SoakDay("d4", "fault", "b", families={"sanity": "pass", "proxies": "fail", "consumers": "pass"}),
        SoakDay("d5", "corrupt", "c", rerun_state="success", rerun_families={"sanity": "pass", "proxies": "pass",
                                                                            "consumers": "fail"}),
    ])
    assert report.summary()["families"] == {
        "sanity": {"shifted_judged": 2, "false_promotions": 2, "normal_judged": 3, "false_holds": 0},
        "proxies": {"shifted_judged": 2, "false_promotions": 1, "normal_judged": 3, "false_holds": 1},
        "consumers": {"shifted_judged": 2, "false_promotions": 1, "normal_judged": 2, "false_holds": 1},
    }
