"""``sumctl doctor`` over a real workspace: git, DVC (a local remote), GTO, the registry, a Feast SQLite online
store and a day's users partition. A consistent workspace is green; each injected disagreement is listed, and
running the repair command the finding prints, as printed, makes the workspace green again."""

from __future__ import annotations

import shlex
import sqlite3
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.slow

DS = ("2026-01-01", "2026-01-02")


@pytest.fixture()
def ctx(tmp_path, monkeypatch, sim_users):
    """Two promoted snapshots of a tiny model (the second is production), the day's users partition and their
    rows in the online store as the daily batch writes them."""
    monkeypatch.setenv("SUM_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("SUM_DVC_REMOTE", str(tmp_path / "remote"))
    from sum_models.model import build_model
    from sum_models.snapshot import export_snapshot
    from sum_pipeline import tasks
    from sum_pipeline.promotion import promote_snapshot
    from sum_platform.context import context
    from sum_platform.feature_store import apply_definitions, feature_spec
    from sum_platform.files import write_parquet
    from sum_platform.versioning import init_workspace_repo

    c = context()
    init_workspace_repo(c.ws.root, c.params.dvc_remote)
    store = apply_definitions(c.params)
    spec = feature_spec(c.params, store)
    write_parquet(sim_users, c.ws.users_dir(DS[1]) / "part-0.parquet")
    for i, ds in enumerate(DS):
        sid = f"sum-{ds}"
        export_snapshot(build_model(spec, c.params.model, seed=i), spec, c.params.model, c.ws.snapshot_dir(sid), sid)
        c.registry.register_candidate(sid, ds, None, {})
        c.registry.record_verdict(sid, True, {"blessed": True, "verdict": "blessed"})
        promote_snapshot(c, sid, actor="test", reason="daily")
    assert tasks.materialize_embeddings(DS[1])["users"] == len(sim_users)
    return c


@pytest.fixture(scope="module")
def sim_users():
    from sum_platform.config import load_params
    from sum_platform.simulate import simulate_day

    _, users = simulate_day(DS[1], load_params())
    return users.head(40).reset_index(drop=True)


def _diagnose(ctx):
    from sum_pipeline.doctor import diagnose

    return diagnose(ctx, serving=False)


def _repair(finding) -> None:
    """Runs a finding's repair as printed (``sumctl`` through its Typer app in this process)."""
    from typer.testing import CliRunner

    from sum_pipeline.cli import app
    from sum_pipeline.doctor import SUMCTL

    command = finding.repair.split("   #", 1)[0].strip()
    if command.startswith("cd "):
        subprocess.run(["bash", "-c", command], check=True, capture_output=True)
        return
    for part in command.split(" && "):
        args = shlex.split(part)
        assert args[0] == SUMCTL, finding
        result = CliRunner().invoke(app, args[1:])
        assert result.exit_code == 0, (part, result.output)


def _only(diagnosis, component: str, text: str):
    assert [f.component for f in diagnosis.findings] == [component], diagnosis.to_dict()
    (finding,) = diagnosis.findings
    assert text in finding.problem, finding
    return finding


def test_a_consistent_workspace_is_green_and_each_disagreement_is_repaired_by_its_command(ctx, sim_users):
    from serving.store_io import PACKED_FIELDS, history_fields, reader_for, write_embeddings
    from sum_platform.feature_store import get_store
    from sum_platform.versioning import production_snapshot, tag_promotion

    healthy = _diagnose(ctx)
    assert healthy.healthy, healthy.to_dict()
    assert healthy.checked["registry"]["promoted"] == 2 and healthy.checked["registry"]["version_tags"] == 2
    assert healthy.checked["manifests"] == 2 and healthy.checked["remote"]["tracked"] >= 2
    assert healthy.checked["online_store"]["rows"] == len(sim_users)

    # GTO's prod moved by hand to the older snapshot: the registry disagrees.
    tag_promotion(ctx.ws.root, f"sum-{DS[0]}", "by hand")
    assert production_snapshot(ctx.ws.root) == f"sum-{DS[0]}"
    _repair(_only(_diagnose(ctx), "versioning", f"registry production is sum-{DS[1]}, GTO's user-tower#prod is sum-{DS[0]}"))
    assert production_snapshot(ctx.ws.root) == f"sum-{DS[1]}" and _diagnose(ctx).healthy

    # A promoted snapshot's weights changed on disk.
    weights = ctx.ws.snapshot_dir(f"sum-{DS[0]}") / "user_tower.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    _repair(_only(_diagnose(ctx), "remote", "differ from the sha256 in its manifest"))
    assert _diagnose(ctx).healthy

    # The remote lost its objects (the local cache still has them).
    remote = ctx.params.dvc_remote
    subprocess.run(["bash", "-c", f"rm -rf {shlex.quote(str(remote))}/*"], check=True)
    _repair(_only(_diagnose(ctx), "remote", "in the local cache only"))
    assert _diagnose(ctx).healthy

    # Online rows a never-promoted snapshot wrote, and a packed copy that disagrees with its fields.
    store = get_store(ctx.params)
    users = sim_users["user_id"].to_numpy()
    write_embeddings(store, users[:3], np.ones((3, *_shape(ctx)), np.float16), "sum-rogue", 123)
    reader = reader_for(store)
    with sqlite3.connect(reader.path) as conn:
        other = conn.execute(f'SELECT value FROM "{reader.table}" WHERE entity_key = ? AND feature_name = ?',
                             (reader._key(int(users[5])), PACKED_FIELDS["served"])).fetchone()[0]
        conn.execute(f'UPDATE "{reader.table}" SET value = ? WHERE entity_key = ? AND feature_name = ?',
                     (other, reader._key(int(users[6])), PACKED_FIELDS["served"]))
    found = _diagnose(ctx)
    problems = " | ".join(f.problem for f in found.findings)
    assert [f.component for f in found.findings] == ["online_store", "online_store"], found.to_dict()
    assert "3 row(s): latest version by sum-rogue, never promoted" in problems
    assert f"1 row(s): served_packed differs from the separate served fields; users e.g. [{int(users[6])}]" in problems
    assert len({f.repair for f in found.findings}) == 1  # one rewrite of the day's rows repairs both
    _repair(found.findings[0])
    assert _diagnose(ctx).healthy

    # Rows lost (a flushed store reads as unknown users): named against the last daily batch, refilled by the rebuild.
    from serving.store_io import delete_rows

    delete_rows(get_store(ctx.params), users[:3])
    found = _only(_diagnose(ctx), "online_store", f"3 of the {len(users)} users the daily batch of {DS[1]} wrote have "
                                                  "no embeddings row (0 were skipped)")
    assert "rebuild-online" in found.repair
    _repair(found)
    assert _diagnose(ctx).healthy

    # The online store file truncated: unreadable; the printed repair refills it from the offline store, the
    # same rows as before (the latest logged row of every user) and their features.
    fields = [*history_fields(_shape(ctx)[0]), *PACKED_FIELDS.values()]
    before = reader_for(get_store(ctx.params)).rows(users.tolist(), fields)
    with sqlite3.connect(reader.path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file, as after any quiet spell
    with open(reader.path, "r+b") as fh:
        fh.truncate(100)  # mid-header: "file is not a database"
    _repair(_only(_diagnose(ctx), "online_store", "the online store cannot be read"))
    assert _diagnose(ctx).healthy
    store = get_store(ctx.params)
    after = reader_for(store).rows(users.tolist(), fields)
    assert after.keys() == before.keys() and len(after) == len(users)
    for uid, row in before.items():
        for name, value in row.items():
            got = after[uid][name]
            assert (np.array_equal(value, got) if isinstance(value, np.ndarray) else value == got), (uid, name)
    from sum_platform.feature_store import feature_spec
    from serving.store_io import read_user_rows

    rows, skipped = read_user_rows(store, users.tolist(), feature_spec(ctx.params, store))
    assert not skipped and len(rows) == len(users)  # the users' features are back too


def _shape(ctx) -> tuple[int, int]:
    return ctx.params.model.num_embeddings, ctx.params.model.embedding_dim


def test_the_store_truncated_while_serving_answers_503_with_a_reason_and_a_rebuild_needs_no_restart(ctx, sim_users,
                                                                                                   ray_serve):
    """The production snapshot served by SOAP (the session's Ray, over HTTP) from the workspace's SQLite online
    store; 4 clients read while the store file is truncated: every read is answered 200 or 503 naming the store,
    never 500; `sumctl rebuild-online` (the repair `sumctl doctor` prints) refills it from the offline store, the
    replicas reopen the new file on their health check, reads answer 200 again without a restart, and `sumctl
    doctor` (serving included) is green."""
    import threading
    import time

    import httpx

    from serving.rollout import base_url, rollout
    from serving.store_io import reader_for
    from sum_pipeline.doctor import diagnose
    from sum_pipeline.promotion import frozen_snapshot
    from sum_platform.feature_store import get_store

    prod = ctx.registry.production().snapshot_id
    result = rollout(ctx.params, ctx.ws.snapshot_dir(prod), prod, frozen=frozen_snapshot(ctx))
    assert result["status"] == "deployed", result
    assert diagnose(ctx).healthy, diagnose(ctx).to_dict()
    users = sim_users["user_id"].tolist()
    url = base_url(ctx.params)
    answers: list[tuple[int, str, float]] = []  # (status, body unless 200, when)
    stop = threading.Event()

    def reader(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            n = 0
            while not stop.is_set():
                r = c.get(f"{url}/users/{users[(i * 11 + n) % len(users)]}/embeddings")
                answers.append((r.status_code, r.text if r.status_code != 200 else "", time.monotonic()))
                n += 1
                time.sleep(0.01)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        path = reader_for(get_store(ctx.params)).path
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file, as after a quiet spell
        with open(path, "r+b") as fh:
            fh.truncate(100)  # mid-header: "file is not a database"
        t_fault = time.monotonic()
        mark = len(answers)
        time.sleep(3)
        during = answers[mark:]
        assert during and {code for code, _, _ in during} == {503}, {code for code, _, _ in during}
        assert all("online store" in text.lower() for _, text, _ in during), during[:3]
        found = diagnose(ctx)
        repair = _only(found, "online_store", "the online store cannot be read")
        _repair(repair)
        t_rebuilt = time.monotonic()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and answers[-1][0] != 200:
            time.sleep(0.5)
        mark = len(answers)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    after = answers[mark:]
    assert after and {code for code, _, _ in after} == {200}, {code for code, _, _ in after}
    assert all(code in (200, 503) for code, _, _ in answers), {code for code, _, _ in answers}
    t_recovered = min(t for code, _, t in answers if code == 200 and t > t_rebuilt)
    report = diagnose(ctx)
    assert report.healthy, report.to_dict()
    assert report.checked["serving"]["snapshot_id"] == prod
    codes = {code: sum(1 for c, _, _ in answers if c == code) for code in {c for c, _, _ in answers}}
    print(f"store truncated while serving: {codes}; rebuilt {t_rebuilt - t_fault:.1f} s after the fault, "
          f"reads 200 again {t_recovered - t_rebuilt:.1f} s after the rebuild")
