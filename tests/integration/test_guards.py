"""``sumctl run --fresh`` and ``sumctl soak`` (as the operator runs them: the ``sumctl`` executable) against a real
workspace holding promotions (git + DVC with a local remote, GTO tags, the registry) with a process of its stack
running: each refuses, names what the workspace holds and the overriding flag, and every file of the workspace and
of its remote is byte-identical afterwards. (The same against the deployed stack: test_deployed_stack.py.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sum_pipeline.stack import IDENTITY_ENV
from sum_platform.registry import Registry
from sum_platform.versioning import init_workspace_repo, list_promotions, tag_promotion
from sum_platform.workspace import Workspace

pytestmark = pytest.mark.slow

SUMCTL = Path(sys.executable).parent / "sumctl"
SIDS = ("sum-2026-01-01", "sum-2026-01-02")


def tree_digest(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (path -> sha256)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def promoted(tmp_path_factory):
    """A workspace with two promotions recorded as a daily run records them (the registry, GTO's tags, the
    snapshots tracked and pushed to its own remote) and a process of its stack (a stand-in carrying the
    workspace's identity, as every stack component does)."""
    base = tmp_path_factory.mktemp("guards")
    ws, remote = Workspace(base / "ws"), base / "ws-dvc-remote"
    ws.claim()
    init_workspace_repo(ws.root, str(remote))
    reg = Registry(ws.registry_db)
    for i, sid in enumerate(SIDS):
        folder = ws.snapshot_dir(sid)
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(f'{{"snapshot_id": "{sid}", "seed": {i}}}')
        reg.register_candidate(sid, sid[4:], SIDS[i - 1] if i else None, {})
        reg.record_verdict(sid, True, {"verdict": "blessed"})
        tag_promotion(ws.root, sid, "daily")
        reg.promote(sid, actor="pipeline")
    assert [p.snapshot_id for p in list_promotions(ws.root)] == list(SIDS)
    component = subprocess.Popen(["sleep", "600"], env={"PATH": "/usr/bin:/bin", IDENTITY_ENV: ws.identity()},
                                 start_new_session=True)
    yield ws, remote, component
    component.kill()
    component.wait()


def _sumctl(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SUM_WORKSPACE", "SUM_DVC_REMOTE")} | {"COLUMNS": "400"}
    return subprocess.run([str(SUMCTL), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("argv", [
    ["run", "--days", "1", "--fresh"],
    ["run", "--days", "1", "--fresh", "--demo"],
    ["run", "--inline", "--days", "1", "--fresh"],
    ["soak", "--days", "3"],
    ["soak", "--days", "3", "--fresh"],
], ids=lambda a: " ".join(a))
def test_refused_and_every_file_byte_identical(promoted, argv):
    ws, remote, component = promoted
    before = tree_digest(ws.root, remote)
    assert any(".sum-remote.json" not in f and "/files/" in f for f in before)  # the remote holds the snapshots
    out = _sumctl(*argv, "--workspace", str(ws.root))
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text
    assert str(ws.root) in text and "2 promotions (production sum-2026-01-02)" in text
    assert "2 GTO promotion tags (user-tower@v0.0.1, user-tower@v0.0.2)" in text
    assert f"a running stack: 1 processes (pids {component.pid})" in text
    assert ("--force-wipe" in text) == ("--fresh" in argv)
    assert tree_digest(ws.root, remote) == before
    assert component.poll() is None
