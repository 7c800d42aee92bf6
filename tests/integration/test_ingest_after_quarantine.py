"""``tasks.ingest`` after a quarantine: simulator days are regenerated, an operator's fixed partition is
used as it is (never overwritten), and the date's quarantine history is reported."""

from __future__ import annotations

import hashlib

import pytest

from sum_pipeline import tasks
from sum_platform.context import context

pytestmark = pytest.mark.slow  # DVC: ingest initialises the workspace repository

DS = "2026-01-02"


def _sha(folder) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.parquet")))).hexdigest()


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path / "ws"))
    return context()


def test_ingest_regenerates_a_quarantined_simulator_day(ctx):
    from validation.quarantine import quarantine_partition

    first = tasks.ingest(DS)
    assert first["written"] and first["simulated"] == ["events", "users"] and "quarantined_before" not in first
    delivered = _sha(ctx.ws.events_dir(DS))
    folder = quarantine_partition(ctx.ws, DS, "drill")

    again = tasks.ingest(DS)
    assert again["simulated"] == ["events", "users"]
    assert again["quarantined_before"] == 1 and again["latest_quarantine"] == str(folder)
    assert _sha(ctx.ws.events_dir(DS)) == delivered  # the simulator is a pure function of (seed, ds)
    assert tasks.ingest(DS)["written"] is False  # in place: left alone


def test_ingest_keeps_an_operators_fixed_partition(ctx):
    from sum_platform.files import write_partition
    from sum_platform.simulate import simulate_day
    from validation.quarantine import quarantine_partition

    tasks.ingest(DS)
    quarantine_partition(ctx.ws, DS, "drill")
    events, _ = simulate_day(DS, ctx.params)
    fixed = events.iloc[: len(events) // 2]  # the operator's own (fixed) delivery
    write_partition(fixed, ctx.ws.events_dir(DS))
    dropped = _sha(ctx.ws.events_dir(DS))

    result = tasks.ingest(DS)
    assert result["simulated"] == ["users"] and result["quarantined_before"] == 1
    assert _sha(ctx.ws.events_dir(DS)) == dropped
    assert any(ctx.ws.users_dir(DS).glob("*.parquet"))
