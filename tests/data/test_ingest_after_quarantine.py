"""``pipeline.ingest`` after a quarantine: simulator days are regenerated, an operator's fixed partition is
used as it is (never overwritten), and the date's quarantine history is reported."""

from __future__ import annotations

import hashlib

import pytest

DS = "2026-01-02"


def _sha(folder) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.parquet")))).hexdigest()


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    from sum_platform import pipeline

    monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path / "ws"))
    return pipeline.context()


def test_ingest_regenerates_a_quarantined_simulator_day(ctx):
    from sum_platform import pipeline
    from validation.quarantine import quarantine_partition

    first = pipeline.ingest(DS)
    assert first["written"] and first["simulated"] == ["events", "users"] and "quarantined_before" not in first
    delivered = _sha(ctx.ws.events_dir(DS))
    folder = quarantine_partition(ctx.ws, DS, "drill")

    again = pipeline.ingest(DS)
    assert again["simulated"] == ["events", "users"]
    assert again["quarantined_before"] == 1 and again["latest_quarantine"] == str(folder)
    assert _sha(ctx.ws.events_dir(DS)) == delivered  # the simulator is a pure function of (seed, ds)
    assert pipeline.ingest(DS)["written"] is False  # in place: left alone


def test_ingest_keeps_an_operators_fixed_partition(ctx):
    from sum_platform import pipeline
    from sum_platform.feature_store import user_feature_fields
    from sum_platform.simulate import fields_from_feast, simulate_day, write_frame
    from validation.quarantine import quarantine_partition

    pipeline.ingest(DS)
    quarantine_partition(ctx.ws, DS, "drill")
    events, _ = simulate_day(DS, ctx.params, fields_from_feast(user_feature_fields(ctx.params)))
    fixed = events.iloc[: len(events) // 2]  # the operator's own (fixed) delivery
    write_frame(fixed, ctx.ws.events_dir(DS))
    dropped = _sha(ctx.ws.events_dir(DS))

    result = pipeline.ingest(DS)
    assert result["simulated"] == ["users"] and result["quarantined_before"] == 1
    assert _sha(ctx.ws.events_dir(DS)) == dropped
    assert any(ctx.ws.users_dir(DS).glob("*.parquet"))
