"""sumctl commands that need no services: snapshots table, promote guard rails."""

from typer.testing import CliRunner

from sum_pipeline.cli import app
from sum_platform.registry import Registry

runner = CliRunner()


def _registry(ws):
    reg = Registry(ws / "registry" / "registry.db")
    reg.register_candidate("sum-2026-01-01", "2026-01-01", None, {
        "data_version": {"data/events/ds=2026-01-01": "abcdef1234.dir"}, "params_digest": "0123456789abcdef",
        "evaluation": {"ne": {"click": 0.93, "conversion": 0.96}}})
    reg.record_verdict("sum-2026-01-01", True, {"verdict": "blessed", "shift": []})
    reg.promote("sum-2026-01-01", actor="pipeline")
    reg.register_candidate("sum-2026-01-02", "2026-01-02", "sum-2026-01-01", {})
    reg.record_verdict("sum-2026-01-02", False, {"verdict": "held", "shift": [
        {"mean_cosine": 0.12, "relative_l2_change": 0.4}, {"mean_cosine": 0.3, "relative_l2_change": 0.2}]})
    return reg


def test_snapshots_table_shows_lineage(tmp_path):
    _registry(tmp_path)
    out = runner.invoke(app, ["snapshots", "--workspace", str(tmp_path)], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "sum-2026-01-01" in out.output and "production" in out.output and "abcdef12" in out.output
    assert "held" in out.output and "0.1200" in out.output and "0.4000" in out.output


def test_snapshots_json_has_full_records(tmp_path):
    _registry(tmp_path)
    out = runner.invoke(app, ["snapshots", "--json", "--workspace", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert '"params_digest": "0123456789abcdef"' in out.output


def test_force_promotion_requires_a_reason(tmp_path):
    out = runner.invoke(app, ["promote", "sum-2026-01-02", "--force", "--workspace", str(tmp_path)])
    assert out.exit_code != 0
    assert "--reason" in out.output


def test_quarantine_list_and_release(tmp_path):
    """An operator sees what the data gate moved aside and why, and can put a false alarm back."""
    from sum_platform.workspace import Workspace
    from validation.quarantine import quarantine_partition

    ws = Workspace(tmp_path)
    for d in (ws.events_dir("2026-01-04"), ws.users_dir("2026-01-04")):
        d.mkdir(parents=True)
        (d / "part-0.parquet").write_bytes(b"payload")
    quarantine_partition(ws, "2026-01-04", {"summary": "data validation failed", "failed_checks": {
        "events": ["expect_column_values_to_be_in_set(click): 339 of 33934 values not in [0, 1]"]}})
    assert not ws.events_dir("2026-01-04").exists()

    out = runner.invoke(app, ["quarantine", "list", "--workspace", str(tmp_path)], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "2026-01-04" in out.output and "quarantined" in out.output
    assert "expect_column_values_to_be_in_set(click)" in out.output

    out = runner.invoke(app, ["quarantine", "release", "2026-01-04", "--workspace", str(tmp_path)])
    assert out.exit_code != 0 and "--reason" in out.output  # a release says why
    out = runner.invoke(app, ["quarantine", "release", "2026-01-04", "--reason", "labels checked by hand",
                              "--actor", "alice", "--workspace", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert (ws.events_dir("2026-01-04") / "part-0.parquet").read_bytes() == b"payload"
    out = runner.invoke(app, ["quarantine", "list", "--json", "--workspace", str(tmp_path)])
    assert '"released_by": "alice"' in out.output and '"release_reason": "labels checked by hand"' in out.output
    # Nothing left to release: a clear error, not a silent no-op.
    out = runner.invoke(app, ["quarantine", "release", "2026-01-04", "--reason", "again", "--workspace", str(tmp_path)])
    assert out.exit_code == 1 and "no quarantined partitions" in out.output

