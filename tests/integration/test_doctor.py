"""``sumctl doctor`` over a real workspace: git, DVC (a local remote), GTO, the registry, a Feast SQLite online
store and a day's users partition. A consistent workspace is green; each injected disagreement is listed, and
running the repair command the finding prints, as printed, makes the workspace green again.

The online store's repairs cannot make it worse, on SQLite and on Redis (the session's redis-server): a rebuild
whose offline source is unreadable fails and leaves every old row as it was, and lost rows are repaired by writing
only those rows."""

from __future__ import annotations

import os
import shlex
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

DS = ("2026-01-01", "2026-01-02")


@pytest.fixture()
def ctx(tmp_path, monkeypatch, sim_users):
    """Two promoted snapshots of a tiny model (the second is production), the day's users partition and their
    rows in the online store as the daily batch writes them."""
    return _workspace(tmp_path, monkeypatch, sim_users)


@pytest.fixture(params=["sqlite", "redis"])
def any_ctx(request, tmp_path, monkeypatch, sim_users):
    """:func:`ctx` with a SQLite online store, then with Redis (the session's server, the ``redis`` profile)."""
    if request.param == "redis":
        request.getfixturevalue("redis_server")["flush"]()  # no rows of an earlier module's workspace
        raw = yaml.safe_load(Path(os.environ["SUM_PARAMS"]).read_text())  # the session's (its Redis port)
        raw["profile"] = "redis"
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(raw))
        monkeypatch.setenv("SUM_PARAMS", str(params_file))
    c = _workspace(tmp_path, monkeypatch, sim_users)
    assert c.params.feature_store.online_store == request.param
    return c


def _workspace(tmp_path, monkeypatch, sim_users):
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
    c.ws.claim()  # the identity serving reports (doctor compares only its own workspace's app)
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
        assert args[0] == shlex.split(SUMCTL)[0], finding
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
    # The rewrite of the day's rows repairs the packed copy; the never-promoted snapshot's versions leave the pools
    # only when retired (a write of production lands in production's own slot, sum_platform.embedding_row).
    repairs = {f.problem.split(";")[0]: f.repair for f in found.findings}
    assert "migrate-embeddings --retire sum-rogue" in repairs["3 row(s): latest version by sum-rogue, never promoted"]
    assert "materialize_embeddings" in repairs["1 row(s): served_packed differs from the separate served fields"]
    for finding in found.findings:
        _repair(finding)
    assert _diagnose(ctx).healthy

    # Rows in the v1 layout (older versions without their snapshot ids, as written before the fields existed):
    # named, and the printed command migrates them without changing a served value.
    from sum_platform.embedding_row import SLOT_ID_FIELDS

    after_batch = f"{DS[1]}T23:59:59.500Z"  # after the daily batch's write, within a rebuild's window
    write_embeddings(store, users[7:9], np.full((2, *_shape(ctx)), 0.25, np.float16), f"sum-{DS[1]}", after_batch,
                     unit="write")
    served = reader.embeddings(users[7:9].tolist())
    with sqlite3.connect(reader.path) as conn:
        conn.executemany(f'DELETE FROM "{reader.table}" WHERE entity_key = ? AND feature_name IN (?, ?)',
                         [(reader._key(int(u)), *SLOT_ID_FIELDS[1:]) for u in users[7:9]])
    found = _only(_diagnose(ctx), "online_store", "2 row(s) in the v1 layout")
    assert "migrate-embeddings" in found.repair
    _repair(found)
    assert _diagnose(ctx).healthy
    for uid, value in reader.embeddings(users[7:9].tolist()).items():
        assert value["embeddings"].tobytes() == served[uid]["embeddings"].tobytes()

    # Rows lost (a flushed store reads as unknown users): named against the last daily batch, refilled by the rebuild.
    from serving.store_io import delete_rows

    delete_rows(get_store(ctx.params), users[:3])
    found = _only(_diagnose(ctx), "online_store", f"3 of the {len(users)} users the daily batch of {DS[1]} wrote have "
                                                  "no embeddings row (0 were skipped)")
    assert "rebuild-online --only-missing" in found.repair
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


def _embedding_rows(ctx, users) -> dict:
    from serving.store_io import PACKED_FIELDS, history_fields, reader_for
    from sum_platform.feature_store import get_store

    return reader_for(get_store(ctx.params)).rows(users, [*history_fields(_shape(ctx)[0]), *PACKED_FIELDS.values()])


def _assert_same_rows(before: dict, after: dict) -> None:
    assert after.keys() == before.keys(), (sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys()))
    for uid, row in before.items():
        for name, value in row.items():
            got = after[uid][name]
            assert (np.array_equal(value, got) if isinstance(value, np.ndarray) else value == got), (uid, name)


def _stored(ctx, users) -> dict:
    """What the store holds for the users' embeddings rows, write times included: SQLite, each (user, feature)'s
    value and ``created_ts``; Redis, the view's fields of each user's hash, raw."""
    from serving.store_io import reader_for
    from sum_platform.feature_store import get_store

    reader = reader_for(get_store(ctx.params))
    if reader.backend == "sqlite":
        with sqlite3.connect(reader.path) as conn:
            return {(reader._key(u), name): (value, created) for u in users for name, value, created in conn.execute(
                f'SELECT feature_name, value, created_ts FROM "{reader.table}" WHERE entity_key = ?', (reader._key(u),))}
    names = [reader._field_hash(f.name) for f in reader.feature_view.features] + [reader._ts_field]
    return {u: reader.redis.hmget(reader.redis_key(u), names) for u in users}


def _staged_leftovers(ctx) -> list:
    """What a rebuild staged and did not remove: SQLite files beside the store, keys in Redis's other databases."""
    from serving.store_io import reader_for, redis_client
    from sum_pipeline.online_rebuild import STAGING_DBS, _with_db
    from sum_platform.feature_store import get_store

    store = get_store(ctx.params)
    reader = reader_for(store)
    if reader.backend == "sqlite":
        return [p.name for p in reader.path.parent.iterdir() if p.name.startswith(f".{reader.path.name}")]
    cs = store.config.online_store.connection_string
    return [(db, n) for db in STAGING_DBS if (n := redis_client(_with_db(cs, db)).dbsize())]


def test_a_rebuild_that_fails_midway_leaves_every_old_row_readable_and_equal(any_ctx, sim_users):
    """The day's embeddings log holds a file that is not parquet: the rebuild materialises the users' features into
    its staging store, then fails on the embeddings; the old store is untouched (every row equal, SQLite: the same
    file), nothing staged is left, `sumctl rebuild-online` exits 1 saying so, and doctor is green. With the file
    gone the rebuild succeeds and the rows are the same."""
    from typer.testing import CliRunner

    from serving.store_io import reader_for
    from sum_pipeline.cli import app
    from sum_pipeline.online_rebuild import RebuildError, rebuild_online_store
    from sum_platform.feature_store import get_store

    ctx = any_ctx
    users = sim_users["user_id"].astype(int).tolist()
    before, stored = _embedding_rows(ctx, users), _stored(ctx, users)
    assert len(before) == len(users)
    reader = reader_for(get_store(ctx.params))
    inode = os.stat(reader.path).st_ino if reader.backend == "sqlite" else None
    bad = ctx.ws.data / "embeddings" / f"ds={DS[1]}" / "zz-unreadable.parquet"
    assert bad.parent.is_dir()
    bad.write_bytes(b"not a parquet file\n" * 64)

    with pytest.raises(RebuildError, match="materialising the offline store failed, the online store is untouched"):
        rebuild_online_store(ctx)
    result = CliRunner().invoke(app, ["rebuild-online"])
    assert result.exit_code == 1 and "untouched" in result.output, result.output
    _assert_same_rows(before, _embedding_rows(ctx, users))
    assert _stored(ctx, users) == stored  # not one row rewritten
    if inode is not None:
        assert os.stat(reader.path).st_ino == inode
    assert _staged_leftovers(ctx) == []
    assert _diagnose(ctx).healthy, _diagnose(ctx).to_dict()

    bad.unlink()
    out = rebuild_online_store(ctx)
    assert out["swap"] == ("transaction" if inode is not None else "keys") and out["users"] == len(users), out
    _assert_same_rows(before, _embedding_rows(ctx, users))
    assert _staged_leftovers(ctx) == []
    assert _diagnose(ctx).healthy


def test_lost_rows_are_repaired_by_writing_only_those_rows(any_ctx, sim_users):
    """Three users lose their rows; doctor prescribes `rebuild-online --only-missing`, which writes their rows back
    (equal to what the daily batch wrote) and no other: every other row keeps its value and write time - one user's
    newer row that the offline log does not hold (a full rebuild would put the logged row back) included."""
    from serving.store_io import delete_rows, write_embeddings
    from sum_platform.feature_store import get_store

    ctx = any_ctx
    users = sim_users["user_id"].astype(int).tolist()
    store = get_store(ctx.params)
    newer = users[10]
    write_embeddings(store, [newer], np.full((1, *_shape(ctx)), 0.5, np.float16), f"sum-{DS[1]}",
                     written_at=4_102_444_800_000, to_offline=False)  # 2100-01-01: not in the offline log
    before = _embedding_rows(ctx, users)
    assert before[newer]["written_at_ms"] == 4_102_444_800_000
    kept = users[3:]
    stored = _stored(ctx, kept)
    delete_rows(store, users[:3])
    found = _only(_diagnose(ctx), "online_store", f"3 of the {len(users)} users the daily batch of {DS[1]} wrote have "
                                                  "no embeddings row")
    assert "rebuild-online --only-missing" in found.repair, found
    _repair(found)
    assert _diagnose(ctx).healthy, _diagnose(ctx).to_dict()
    _assert_same_rows(before, _embedding_rows(ctx, users))
    assert _stored(ctx, kept) == stored  # the others not rewritten: the same values and write times
    assert _staged_leftovers(ctx) == []


def test_the_store_truncated_while_serving_answers_503_with_a_reason_and_a_rebuild_needs_no_restart(ctx, sim_users,
                                                                                                   ray_serve):
    """The production snapshot served by SOAP (the session's Ray, over HTTP) from the workspace's SQLite online
    store; 4 clients read while the store file is truncated: every read is answered 200 or 503 naming the store,
    never 500, and reads that started after the truncation answer 503 (or 200 from a page cached before it); `sumctl
    rebuild-online` (the repair `sumctl doctor` prints) refills it from the offline store beside the old file and
    swaps, the replicas reopen the new file on their health check, reads answer 200 again without a restart, and
    `sumctl doctor` (serving included: the app is this workspace's) is green. Reads are classified by when they
    started, and each phase waits for a number of answers, not for a time."""
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
    answers: list[tuple[int, str, float]] = []  # (status, body unless 200, when the request started)
    errors: list[BaseException] = []  # a reader thread's death, reported instead of a misleading count
    lock = threading.Lock()
    stop = threading.Event()

    def reader(i: int) -> None:
        try:
            with httpx.Client(timeout=30) as c:
                n = 0
                while not stop.is_set():
                    started = time.monotonic()
                    r = c.get(f"{url}/users/{users[(i * 11 + n) % len(users)]}/embeddings")
                    with lock:
                        answers.append((r.status_code, r.text if r.status_code != 200 else "", started))
                    n += 1
                    time.sleep(0.01)  # pacing only
        except BaseException as exc:  # noqa: BLE001 - any death is reported by the main thread
            errors.append(exc)

    def started_within(lo: float, hi: float = float("inf")) -> list[tuple[int, str, float]]:
        with lock:
            return [a for a in answers if lo < a[2] < hi]

    def until(what: str, done, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert not errors, f"a reader thread died: {errors[0]!r}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
            time.sleep(0.05)

    def run_of_200(since: float, n: int) -> bool:
        latest = sorted(started_within(since), key=lambda a: a[2])[-n:]
        return len(latest) == n and all(code == 200 for code, _, _ in latest)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        t_start = time.monotonic()
        until("40 reads answered 200 before the fault", lambda: run_of_200(t_start, 40))
        path = reader_for(get_store(ctx.params)).path
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file, as after a quiet spell
        with open(path, "r+b") as fh:
            fh.truncate(100)  # mid-header: "file is not a database"
        t_fault = time.monotonic()
        until("40 reads started after the truncation", lambda: len(started_within(t_fault)) >= 40)
        t_repair = time.monotonic()
        during = started_within(t_fault, t_repair)
        # A replica's SQLite connection may still answer a user from pages it cached before the truncation (in
        # WAL mode nothing tells it the main file changed): such a read is a correct 200, not a failure. What
        # must hold: no other status, and the damage reaches the callers as 503s naming the store.
        assert during and {code for code, _, _ in during} <= {200, 503}, {code for code, _, _ in during}
        assert any(code == 503 for code, _, _ in during), "no read answered 503 after the truncation"
        during = [a for a in during if a[0] == 503]
        assert all("online store" in text.lower() and "request id" in text for _, text, _ in during), during[:3]
        repair = _only(diagnose(ctx), "online_store", "the online store cannot be read")
        _repair(repair)
        t_rebuilt = time.monotonic()
        # Each replica reopens the new file on its own health check: wait for a run of reads all answered 200 ...
        until("a run of 40 reads answered 200 after the rebuild", lambda: run_of_200(t_rebuilt, 40))
        t_steady = time.monotonic()
        until("40 more reads", lambda: len(started_within(t_steady)) >= 40)  # ... and every read after it too
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, f"a reader thread died: {errors[0]!r}"
    assert not any(t.is_alive() for t in threads)
    after = started_within(t_steady)
    assert after and {code for code, _, _ in after} == {200}, {code for code, _, _ in after}
    with lock:
        assert all(code in (200, 503) for code, _, _ in answers), {code for code, _, _ in answers}
        t_recovered = min(t for code, _, t in answers if code == 200 and t > t_rebuilt)
        codes = {code: sum(1 for c, _, _ in answers if c == code) for code in {c for c, _, _ in answers}}
    report = diagnose(ctx)
    assert report.healthy, report.to_dict()
    assert report.checked["serving"]["snapshot_id"] == prod and report.checked["serving"]["compared"]
    print(f"store truncated while serving: {codes}; rebuilt {t_rebuilt - t_fault:.1f} s after the fault, "
          f"reads 200 again {t_recovered - t_rebuilt:.1f} s after the rebuild")
