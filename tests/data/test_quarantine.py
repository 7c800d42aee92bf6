"""Quarantine of a failed day's partitions: moved aside with a reason, never deleted, rerun-safe."""

from __future__ import annotations

import json

import pytest

from sum_platform.workspace import Workspace
from validation.quarantine import quarantine_partition, quarantined, reason_from_error, release_partition

DS = "2026-01-05"


def _day(ws: Workspace, ds: str = DS) -> dict[str, bytes]:
    """A fake partition pair (the quarantine moves folders; it never parses them)."""
    out = {}
    for kind, folder in (("events", ws.events_dir(ds)), ("users", ws.users_dir(ds))):
        folder.mkdir(parents=True)
        payload = f"{kind} of {ds}".encode()
        (folder / "part-0.parquet").write_bytes(payload)
        out[kind] = payload
    return out


def test_quarantine_moves_both_partitions_with_a_reason(tmp_path):
    ws = Workspace(tmp_path)
    payloads = _day(ws)
    reason = {"failed_checks": {"events": ["expect_column_values_to_be_in_set(click): 3 of 10 values not in [0, 1]"]}}
    folder = quarantine_partition(ws, DS, reason)

    assert folder.parent == ws.quarantine_dir(DS)
    assert not ws.events_dir(DS).exists() and not ws.users_dir(DS).exists()
    for kind, payload in payloads.items():
        assert (folder / kind / "part-0.parquet").read_bytes() == payload  # moved intact, not deleted
    record = json.loads((folder / "reason.json").read_text())
    assert record["status"] == "quarantined" and record["ds"] == DS
    assert record["reason"]["failed_checks"]["events"][0].startswith("expect_column_values_to_be_in_set(click)")
    assert record["moved"]["events"]["from"] == f"data/events/ds={DS}"
    assert record["moved"]["users"]["files"] == [{"name": "part-0.parquet", "bytes": len(payloads["users"])}]
    assert record["absent"] == []


def test_quarantine_is_rerun_safe_and_keeps_every_attempt(tmp_path):
    ws = Workspace(tmp_path)
    _day(ws)
    first = quarantine_partition(ws, DS, "bad labels")
    again = quarantine_partition(ws, DS, "called twice")  # nothing left in place: nothing moves, nothing lost
    assert again != first and (first / "events" / "part-0.parquet").exists()
    assert json.loads((again / "reason.json").read_text())["absent"] == ["events", "users"]

    # A fixed partition that fails again gets its own folder; the earlier ones stay.
    _day(ws)
    third = quarantine_partition(ws, DS, {"summary": "still bad"})
    records = quarantined(ws, DS)
    assert [r["folder"] for r in records] == [str(first), str(again), str(third)]
    assert records[0]["reason"] == {"summary": "bad labels"}
    assert (third / "users" / "part-0.parquet").exists()


def test_quarantine_of_a_day_with_a_missing_partition(tmp_path):
    ws = Workspace(tmp_path)
    ws.events_dir(DS).mkdir(parents=True)
    (ws.events_dir(DS) / "part-0.parquet").write_bytes(b"x")
    folder = quarantine_partition(ws, DS, "users partition missing")
    record = json.loads((folder / "reason.json").read_text())
    assert sorted(record["moved"]) == ["events"] and record["absent"] == ["users"]


def test_release_moves_a_quarantined_pair_back_without_overwriting(tmp_path):
    ws = Workspace(tmp_path)
    payloads = _day(ws)
    folder = quarantine_partition(ws, DS, "false alarm")
    released = release_partition(ws, DS)
    assert released == folder
    assert (ws.events_dir(DS) / "part-0.parquet").read_bytes() == payloads["events"]
    assert json.loads((folder / "reason.json").read_text())["status"] == "released"

    quarantine_partition(ws, DS, "again")
    _day(ws, DS)  # a fixed partition is in place now: releasing the old one must not clobber it
    with pytest.raises(FileExistsError):
        release_partition(ws, DS)
    with pytest.raises(LookupError):
        release_partition(ws, "2026-02-01")


def test_reason_from_a_validation_error_names_the_failed_checks():
    from validation.data_checks import DataValidationError, ValidationReport

    reports = [
        ValidationReport("events", DS, False, failed=["expect_column_mean_to_be_between(click): label rate 0"],
                         data_docs_index="/ws/gx/index.html"),
        ValidationReport("users", DS, True, warnings=["expect_table_columns_to_match_set(table): unexpected"]),
    ]
    err = DataValidationError(reports)
    reason = reason_from_error(err)
    assert reason["failed_checks"] == {"events": ["expect_column_mean_to_be_between(click): label rate 0"]}
    assert reason["warnings"] == {"users": ["expect_table_columns_to_match_set(table): unexpected"]}
    assert reason["data_docs"] == "/ws/gx/index.html"
    err.set_quarantine("/ws/quarantine/ds=2026-01-05/x")
    assert str(err).endswith("Quarantined to: /ws/quarantine/ds=2026-01-05/x")
    assert "expect_column_mean_to_be_between(click)" in str(err)
