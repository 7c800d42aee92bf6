"""The audit trail survives the disk: a workspace with promotions, a held candidate a human approved, a rollback and
a quarantined day is deleted, ``sumctl restore`` rebuilds it from the DVC remote folder alone (the workspace's git
history is backed up inside it), ``doctor`` is green and the lineage, the audit log, the day records and the
quarantine are what they were. Real git, DVC, GTO, Feast (SQLite online store) and the registry; the days' tasks run
in this process as the scheduler runs them, with tiny snapshots instead of training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKSPACE_NAME = "restore-workspace"
DAYS = ("2026-01-01", "2026-01-02", "2026-01-03")
QUARANTINED = "2026-01-04"


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def remote(module_workspace: Path, session_dir: Path):
    """The module's own DVC remote (``SUM_DVC_REMOTE``), restored afterwards."""
    folder = session_dir / f"{WORKSPACE_NAME}-remote"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUM_DVC_REMOTE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def before(module_workspace: Path, remote: Path) -> dict:
    """Two days ingested and versioned, a fourth quarantined; day 1 promoted by the gate (its first attempt killed
    before the audit trail), day 2 too and its batch materialised, day 3 held and then approved by a human, then
    rolled back to day 2. Returns what the restore must bring back."""
    from sum_models.model import build_model
    from sum_models.snapshot import export_snapshot
    from sum_pipeline import tasks
    from sum_pipeline.promotion import promote_snapshot, rollback_production
    from sum_platform.context import context
    from sum_platform.feature_store import apply_definitions, feature_spec
    from validation.quarantine import quarantine_partition

    ctx = context()
    assert ctx.ws.root == module_workspace
    for ds in DAYS[:2]:  # the third day's snapshot is judged on no data of its own: a held candidate needs none here
        tasks.ingest(ds)
        tasks.version_data(ds)
    tasks.ingest(QUARANTINED)
    quarantine_partition(ctx.ws, QUARANTINED, "drill: the partition arrived corrupted")
    spec = feature_spec(ctx.params, apply_definitions(ctx.params))
    for i, ds in enumerate(DAYS):
        sid = f"sum-{ds}"
        export_snapshot(build_model(spec, ctx.params.model, seed=i), spec, ctx.params.model, ctx.ws.snapshot_dir(sid), sid)
        prod = ctx.registry.production()
        ctx.registry.register_candidate(sid, ds, prod.snapshot_id if prod else None, {"params": "tiny"})
        blessed = ds != DAYS[2]
        ctx.registry.record_verdict(sid, blessed, {"blessed": blessed, "verdict": "blessed" if blessed else "held",
                                                   "reasons": [] if blessed else ["mean cosine below threshold"]})
        if ds == DAYS[0]:
            _promotion_dies_before_its_audit_trail_then_the_rerun_pushes_it(ctx, ds)
        elif blessed:
            tasks.promote(ds)
        else:  # the answer approve_held gets from the Airflow UI
            approval = {"chosen_options": ["Approve"], "responded_by_user": {"name": "alice"},
                        "params_input": {"reason": "known shift: the new catalogue"}}
            promote_snapshot(ctx, sid, **tasks.approval_override(approval))
        if ds == DAYS[1]:
            tasks.materialize_embeddings(ds)
    rolled = rollback_production("bob", "incident 7: CTR dropped", reroll=False)
    assert rolled["to"] == f"sum-{DAYS[1]}"

    from sum_pipeline.doctor import diagnose

    report = diagnose(ctx, serving=False)
    assert report.healthy, report.findings
    assert report.checked["online_store"]["retired_snapshots"] == [f"sum-{DAYS[2]}"]  # its late writes are dropped
    return {
        "lineage": [r.to_dict() for r in ctx.registry.list()],
        "events": ctx.registry.events(),
        "runs": _tree(ctx.ws.root / "runs"),
        "quarantine": _tree(ctx.ws.root / "quarantine"),
        "identity": ctx.ws.identity(),
        "head": _git(ctx.ws.root, "rev-parse", "HEAD"),
        "tags": _git(ctx.ws.root, "tag", "--list"),
        "snapshots": {sid: _tree(ctx.ws.snapshot_dir(sid)) for sid in (f"sum-{ds}" for ds in DAYS)},
    }


class Interrupted(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


def _backup_head(ctx) -> str | None:
    from sum_platform.versioning import list_backups

    backups = list_backups(ctx.params.dvc_remote)
    return _git(backups[ctx.ws.identity()], "rev-parse", "main") if backups else None


def _promotion_dies_before_its_audit_trail_then_the_rerun_pushes_it(ctx, ds: str) -> None:
    """Killed after the registry flipped, before the trail was versioned: production is promoted, the remote has
    neither the trail nor the history; rerunning the promotion (the task's retry) pushes both, logging no second
    promotion."""
    from sum_pipeline import promotion, tasks

    def die(*args, **kwargs):
        raise Interrupted("killed before the audit trail")

    original = promotion.save_audit_trail
    promotion.save_audit_trail = die
    try:
        with pytest.raises(Interrupted):
            tasks.promote(ds)
    finally:
        promotion.save_audit_trail = original
    assert ctx.registry.production().snapshot_id == f"sum-{ds}"
    assert not (ctx.ws.root / "audit.dvc").exists() and _backup_head(ctx) is None
    tasks.promote(ds)
    assert (ctx.ws.root / "audit.dvc").exists() and _backup_head(ctx) == _git(ctx.ws.root, "rev-parse", "HEAD")
    assert [e["action"] for e in ctx.registry.events(f"sum-{ds}")].count("promote") == 1


@pytest.fixture(scope="module")
def restored(before: dict, module_workspace: Path, remote: Path):
    """The workspace deleted (the disk lost), then ``sumctl restore`` with nothing but the DVC remote folder."""
    from typer.testing import CliRunner

    from sum_pipeline.cli import app

    shutil.rmtree(module_workspace)
    result = CliRunner().invoke(app, ["restore"])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_audit_trail_and_history_are_in_the_remote(before, remote):
    """Every promotion, the approval and the rollback pushed the history: the remote's backup is at the workspace's
    HEAD, and its last commit versions the audit trail."""
    (backup,) = (remote / "workspaces").glob("*.git")
    assert backup.name == f"{before['identity']}.git"
    assert _git(backup, "rev-parse", "main") == before["head"]
    assert _git(backup, "log", "-1", "--format=%s", "main") == f"audit: rollback from sum-{DAYS[2]} to sum-{DAYS[1]} by bob"
    assert _git(backup, "tag", "--list") == before["tags"]


def test_restore_rebuilds_a_green_workspace_with_the_same_lineage_and_audit_log(before, restored):
    from sum_pipeline.doctor import diagnose
    from sum_platform.context import context

    ctx = context()
    report = diagnose(ctx, serving=False)
    assert report.healthy, report.findings
    assert report.checked["registry"]["production"] == f"sum-{DAYS[1]}" == report.checked["registry"]["gto_production"]
    assert report.checked["online_store"]["batch"]["ds"] == DAYS[1]

    assert [r.to_dict() for r in ctx.registry.list()] == before["lineage"]
    assert ctx.registry.events() == before["events"]
    approval = [e for e in before["events"] if e["action"] == "promote" and e["actor"] == "alice"]
    assert approval and "known shift" in approval[0]["detail"]["reason"]
    assert _tree(ctx.ws.root / "runs") == before["runs"]
    assert _tree(ctx.ws.root / "quarantine") == before["quarantine"]
    assert any(name.endswith("reason.json") for name in before["quarantine"])
    assert ctx.ws.identity() == before["identity"]
    assert _git(ctx.ws.root, "tag", "--list") == before["tags"]
    for sid, files in before["snapshots"].items():
        assert _tree(ctx.ws.snapshot_dir(sid)) == files


def test_the_restored_workspace_goes_on_promoting_and_backing_up(before, restored, remote):
    """A rollback in the restored workspace (back to day 3) pushes to the same backup, fast-forward."""
    from sum_pipeline.promotion import rollback_production
    from sum_platform.context import context

    out = rollback_production("carol", "after the restore", to=f"sum-{DAYS[2]}", reroll=False)
    assert out["to"] == f"sum-{DAYS[2]}"
    ctx = context()
    (backup,) = (remote / "workspaces").glob("*.git")
    assert _git(backup, "rev-parse", "main") == _git(ctx.ws.root, "rev-parse", "HEAD")
    assert ctx.registry.events()[: len(before["events"])] == before["events"]


def test_restore_refuses_a_folder_that_is_not_empty(restored, module_workspace):
    from typer.testing import CliRunner

    from sum_pipeline.cli import app

    head = _git(module_workspace, "rev-parse", "HEAD")
    files = sorted(p.relative_to(module_workspace).as_posix() for p in module_workspace.rglob("*"))
    result = CliRunner().invoke(app, ["restore"])
    assert result.exit_code == 1
    output = "".join(result.output.split())  # the console wraps long lines
    assert "notempty" in output and str(module_workspace) in output
    assert _git(module_workspace, "rev-parse", "HEAD") == head
    assert sorted(p.relative_to(module_workspace).as_posix() for p in module_workspace.rglob("*")) == files


def test_a_copy_with_the_same_identity_cannot_overwrite_the_backup(restored, module_workspace, tmp_path):
    """A clone of the workspace used elsewhere under the same identity pushes first; the workspace's next push is
    refused, naming the cause, and the backup keeps the copy's commits."""
    from sum_platform.versioning import BACKUP_REMOTE, VersioningError, push_backup

    url = _git(module_workspace, "remote", "get-url", BACKUP_REMOTE)
    copy = tmp_path / "copy"
    _git(tmp_path, "clone", "-q", str(module_workspace), str(copy))
    _git(copy, "remote", "add", BACKUP_REMOTE, url)
    _git(copy, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "the copy's work")
    push_backup(copy)
    _git(module_workspace, "commit", "-q", "--allow-empty", "-m", "the workspace's work")
    with pytest.raises(VersioningError, match="same identity"):
        push_backup(module_workspace)
    assert _git(Path(url), "log", "-1", "--format=%s", "main") == "the copy's work"


def test_a_restore_that_fails_leaves_nothing_behind(restored, remote, tmp_path, monkeypatch):
    """A remote folder holding the history but not the data (only its workspaces/ copied): `dvc pull` fails, the
    command says so, and neither the workspace nor the restore's hidden staging folder is left."""
    from typer.testing import CliRunner

    from sum_pipeline.cli import app

    (backup,) = (remote / "workspaces").glob("*.git")
    partial = tmp_path / "partial-remote"
    subprocess.run(["git", "clone", "-q", "--bare", str(backup), str(partial / "workspaces" / backup.name)], check=True)
    for name in ("SUM_WORKSPACE", "SUM_DVC_REMOTE"):  # the command sets both for its process: put them back after
        monkeypatch.setenv(name, os.environ[name])
    target = tmp_path / "ws"
    result = CliRunner().invoke(app, ["restore", "--workspace", str(target), "--remote", str(partial), "--no-online"])
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "left as it was" in output and "dvc pull" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial-remote"]
