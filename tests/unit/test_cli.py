"""sumctl commands that need no services: snapshots table, promote guard rails, ``--fresh``'s and the soak's
refusals (which stop before anything starts), the DVC remote a workspace gets."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sum_pipeline.cli import _setup, app
from sum_pipeline.stack import IDENTITY_ENV
from sum_platform.config import load_params
from sum_platform.registry import Registry
from sum_platform.workspace import Workspace

runner = CliRunner()


@pytest.fixture(autouse=True)
def environment_restored():
    """The commands run in this process and set ``SUM_WORKSPACE``, ``SUM_DVC_REMOTE``... for the tasks they
    start (cli._setup): every variable is put back as it was, so no later test sees a deleted tmp_path."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


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



def _promoted_workspace(root: Path, purpose: str = "workspace") -> Workspace:
    ws = Workspace(root)
    ws.claim(purpose)
    _registry(root)
    return ws


def test_fresh_refuses_a_workspace_with_a_promotion_and_a_running_stack(tmp_path):
    ws = _promoted_workspace(tmp_path / "ws")
    component = subprocess.Popen(["sleep", "300"], env={"PATH": "/usr/bin:/bin", IDENTITY_ENV: ws.identity()},
                                 start_new_session=True)
    try:
        before = tree_digest(tmp_path)
        for argv in (["run", "--days", "1", "--fresh"], ["run", "--inline", "--days", "1", "--fresh"],
                     ["run", "--days", "1", "--fresh", "--demo"]):
            out = runner.invoke(app, [*argv, "--workspace", str(ws.root)], env={"COLUMNS": "400"})
            assert out.exit_code == 2, out.output
            text = " ".join(out.output.split())
            assert f"refusing to delete the workspace {ws.root} (workspace)" in text
            assert "1 promotion (production sum-2026-01-01)" in text
            assert f"a running stack: 1 processes (pids {component.pid})" in text and "--force-wipe" in text
            assert tree_digest(tmp_path) == before
        assert component.poll() is None  # nothing stopped either
    finally:
        component.kill()
        component.wait()


def test_fresh_refuses_a_folder_that_is_not_a_workspace(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    out = runner.invoke(app, ["run", "--fresh", "--force-wipe", "--workspace", str(tmp_path)], env={"COLUMNS": "400"})
    assert out.exit_code == 2 and "is not a SUM workspace" in " ".join(out.output.split())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_soak_runs_only_in_a_workspace_of_its_own(tmp_path):
    ws = _promoted_workspace(tmp_path / "ws")
    before = tree_digest(tmp_path)
    for argv in (["soak", "--days", "3"], ["soak", "--days", "3", "--fresh"]):
        out = runner.invoke(app, [*argv, "--workspace", str(ws.root)], env={"COLUMNS": "400"})
        assert out.exit_code == 2, out.output
        assert "1 promotion (production sum-2026-01-01)" in " ".join(out.output.split())
    assert tree_digest(tmp_path) == before


def test_soak_defaults_to_a_workspace_beside_the_configured_one(tmp_path, monkeypatch):
    # The default soak workspace is made a non-workspace folder: the refusal names the path the soak chose.
    monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path / "main"))
    (tmp_path / "main-soak").mkdir()
    (tmp_path / "main-soak" / "x").write_text("x")
    out = runner.invoke(app, ["soak", "--days", "3"], env={"COLUMNS": "400"})
    assert out.exit_code == 2 and f"{tmp_path / 'main-soak'} is not a SUM workspace" in " ".join(out.output.split())


def test_a_malformed_fault_is_a_usage_error(tmp_path):
    for value in ("2026-01-03", "2026-01-03=melt", "tomorrow=reinit"):
        out = runner.invoke(app, ["run", "--fault", value, "--workspace", str(tmp_path / "ws")])
        assert out.exit_code == 2 and "is not DATE=KIND" in out.output, out.output
    assert not (tmp_path / "ws").exists()


def test_a_workspace_of_its_own_gets_a_remote_of_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("SUM_DVC_REMOTE", raising=False)
    configured = load_params()
    p, _ = _setup(None, None)  # the configured workspace keeps the configured remote
    assert p.workspace == configured.workspace and p.dvc_remote == str(configured.resolve(configured.paths.dvc_remote))
    p, ws = _setup(tmp_path / "mine", None)
    assert p.dvc_remote == str(tmp_path / "mine-dvc-remote") == os.environ["SUM_DVC_REMOTE"]
    # An initialised workspace keeps the remote its DVC config names; a named remote wins over both.
    monkeypatch.delenv("SUM_DVC_REMOTE")
    (tmp_path / "old" / ".dvc").mkdir(parents=True)
    (tmp_path / "old" / ".dvc" / "config").write_text("[core]\n    remote = storage\n['remote \"storage\"']\n"
                                                     "    url = /backups/old-remote\n")
    assert _setup(tmp_path / "old", None)[0].dvc_remote == "/backups/old-remote"
    monkeypatch.setenv("SUM_DVC_REMOTE", "s3://named/remote")
    assert _setup(tmp_path / "mine", None)[0].dvc_remote == "s3://named/remote"


def test_fresh_recreates_a_demo_workspace_after_stopping_its_stack(tmp_path, monkeypatch):
    """`make run` twice: the second finds the first's demo workspace (promotions, a running stack), stops the
    stack, deletes the workspace and the remote created for it, and starts a new demo workspace."""
    from sum_pipeline.cli import _prepare
    from sum_platform.workspace import claim_remote, remote_claims

    monkeypatch.setenv("SUM_DVC_REMOTE", str(tmp_path / "remote"))
    p, ws = _setup(tmp_path / "demo", None)
    _prepare(p, ws, own="demo", purpose="demo", fresh=True)  # the first `make run`
    old = ws.identity()
    assert ws.purpose() == "demo" and remote_claims(str(tmp_path / "remote"))["created_for"] == old
    _registry(ws.root)
    (tmp_path / "remote" / "files").mkdir()
    component = subprocess.Popen(["sleep", "300"], env={"PATH": "/usr/bin:/bin", IDENTITY_ENV: old},
                                 start_new_session=True)
    try:
        _prepare(p, ws, own="demo", purpose="demo", fresh=True)  # the second
        assert component.wait(timeout=30) is not None  # stopped by the stack's `down`, found by identity
    finally:
        if component.poll() is None:
            component.kill()
            component.wait()
    new = ws.identity()
    assert new not in (None, old) and ws.purpose() == "demo" and not ws.registry_db.exists()
    claims = remote_claims(str(tmp_path / "remote"))
    assert claims["created_for"] == new and list(claims["workspaces"]) == [new]
    assert not (tmp_path / "remote" / "files").exists()
    claim_remote(str(tmp_path / "remote"), ws)  # idempotent
    assert remote_claims(str(tmp_path / "remote")) == claims


def test_fresh_lists_what_it_could_not_delete_and_stops(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    ws.claim("demo")
    (ws.root / "data").mkdir()
    (ws.root / "data" / "part-0.parquet").write_bytes(b"x")
    unlink = os.unlink

    def refusing(path, *args, **kwargs):  # the tests run as root, whom permissions do not stop
        if os.fspath(path).endswith("part-0.parquet"):
            raise PermissionError(13, "Permission denied")
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing)
    out = runner.invoke(app, ["run", "--fresh", "--workspace", str(ws.root)], env={"COLUMNS": "400"})
    monkeypatch.setattr(os, "unlink", unlink)
    text = " ".join(out.output.split())
    assert out.exit_code == 1, out.output
    assert "could not delete:" in text and "part-0.parquet: [Errno 13] Permission denied" in text
    assert (ws.root / "data" / "part-0.parquet").exists()


def test_soak_refuses_a_serving_port_already_taken(tmp_path):
    """After `make run` a stack serves on serving.port: the soak, which deploys its own app there, says so first."""
    import socket

    import yaml

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        raw = yaml.safe_load(Path(os.environ["SUM_PARAMS"]).read_text())
        raw["serving"]["port"] = listener.getsockname()[1]
        raw["paths"] = {"workspace": "ws", "dvc_remote": "remote"}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        out = runner.invoke(app, ["soak", "--days", "3", "--fresh", "--params", str(tmp_path / "params.yaml")],
                            env={"COLUMNS": "400"})
    assert out.exit_code == 2, out.output
    assert f"serving.port {raw['serving']['port']}, which something already listens on" in " ".join(out.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no soak workspace made


def test_force_wipe_stops_the_stack_then_deletes(tmp_path, monkeypatch):
    from sum_pipeline.cli import _prepare

    monkeypatch.setenv("SUM_DVC_REMOTE", str(tmp_path / "remote"))
    p, ws = _setup(tmp_path / "ws", None)
    _prepare(p, ws, own="demo", purpose="workspace", fresh=False)
    _registry(ws.root)
    component = subprocess.Popen(["sleep", "300"], env={"PATH": "/usr/bin:/bin", IDENTITY_ENV: ws.identity()},
                                 start_new_session=True)
    try:
        _prepare(p, ws, own="demo", purpose="workspace", fresh=True, force=True)
        assert component.wait(timeout=30) is not None
    finally:
        if component.poll() is None:
            component.kill()
            component.wait()
    assert not ws.registry_db.exists() and ws.purpose() == "workspace"
