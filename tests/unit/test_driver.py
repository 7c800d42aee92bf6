"""The run note the driver writes: the verdict's headline within Airflow's 1000-character limit."""

from sum_pipeline.airflow_env import DagRunResult
from sum_pipeline.driver import NOTE_MAX, verdict_note


def _result(verdict, states=None, served=None):
    xcoms = {"shift_gate.verdict": verdict, "evaluate": {"ne": {"click": 0.88, "conversion": 0.93}}}
    if served:
        xcoms["verify_serving"] = {"served_snapshot_id": served}
    return DagRunResult(ds="2026-01-02", state="success", task_states=states or {}, xcoms=xcoms)


def test_blessed_note_names_the_snapshot_what_is_served_and_the_numbers():
    verdict = {"verdict": "blessed", "blessed": True, "snapshot_id": "sum-2026-01-02",
               "shift": [{"mean_cosine": 0.91, "relative_l2_change": 0.2}], "reasons": ["ok"]}
    note = verdict_note(_result(verdict, served="sum-2026-01-02"))
    assert note.startswith("**blessed** `sum-2026-01-02` - serving `sum-2026-01-02`")
    assert "NE click 0.8800" in note and "e0: cos 0.910, ΔL2 0.200" in note
    assert "- ok" not in note


def test_a_held_note_lists_the_reasons_and_stays_within_the_limit():
    reasons = [f"embedding_{i}.mean_cosine = -0.01, needs >= 0.5 " + "x" * 80 for i in range(30)]
    verdict = {"verdict": "held", "blessed": False, "snapshot_id": "sum-2026-01-04", "shift": [], "reasons": reasons}
    note = verdict_note(_result(verdict))
    assert note.startswith("**held** `sum-2026-01-04`")
    assert "- embedding_0.mean_cosine" in note
    assert len(note) == NOTE_MAX and note.endswith("…")


def test_an_approved_hold_says_so_and_a_run_without_verdict_names_the_failed_task():
    verdict = {"verdict": "held", "blessed": False, "snapshot_id": "s", "shift": [], "reasons": ["r"]}
    note = verdict_note(_result(verdict, {"approve_held": "success", "promote": "success"}, served="s"))
    assert "approved by a human" in note
    failed = DagRunResult(ds="d", state="failed", task_states={"validate_data": "failed", "evaluate": "upstream_failed"})
    assert verdict_note(failed) == "**failed** - stopped at validate_data"


def test_a_nan_candidates_note_says_n_a_where_the_gate_stored_no_number():
    verdict = {"verdict": "held", "blessed": False, "snapshot_id": "sum-2026-01-05",
               "shift": [{"mean_cosine": None, "relative_l2_change": None}],
               "reasons": ["weights_finite = 0, needs >= 1"]}
    result = _result(verdict)
    result.xcoms["evaluate"] = {"ne": {"click": None, "conversion": float("nan")}}
    note = verdict_note(result)
    assert "e0: cos n/a, ΔL2 n/a" in note and "NE click n/a, conversion n/a" in note
    assert "- weights_finite = 0, needs >= 1" in note


def test_the_note_carries_each_consumer_s_change_and_what_held():
    consumers = [{"consumer": "click", "change_pct": 8.2, "change_ci": [7.1, 9.4], "outcome": "fail"},
                 {"consumer": "inbox", "change_pct": -0.1, "change_ci": [-0.6, 0.4], "outcome": "pass"},
                 {"consumer": "conversion", "change_pct": None, "change_ci": None, "outcome": "not_measurable"}]
    verdict = {"verdict": "held", "blessed": False, "snapshot_id": "s", "shift": [], "reasons": ["r"],
               "consumers": consumers}
    note = verdict_note(_result(verdict))
    assert "consumer click: NE +8.20 % [+7.10, +9.40] HOLDS" in note
    assert "consumer inbox: NE -0.10 % [-0.60, +0.40]" in note and "consumer conversion: not measurable" in note


def test_the_asset_event_summary_carries_the_consumers():
    from validation.gate import verdict_summary

    verdict = {"snapshot_id": "s", "verdict": "held", "blessed": False, "checks": [], "reasons": [],
               "consumers": [{"consumer": "click", "change_pct": 8.2, "change_ci": [7.1, 9.4], "worse_share": 0.3,
                              "vs_without_pct": 2.0, "outcome": "fail"}]}
    [row] = verdict_summary(verdict, {"click": 0.9})["consumers"]
    assert row == {"consumer": "click", "change_pct": 8.2, "change_ci": [7.1, 9.4], "worse_share": 0.3,
                   "vs_without_pct": 2.0, "outcome": "fail"}
