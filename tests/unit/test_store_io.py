"""The ``sum_embeddings`` row (``serving.store_io``) on a real Feast online store (SQLite, and Redis), no Ray.

The feature repo is applied to a tmp workspace (tiny K and D); user features are written to the online
store as the daily materialization would. Covers the pooled write of paper §5.2 under both pool units
(``sum_platform.embedding_row``: a version per snapshot or per write), the direct read against Feast's own,
concurrent writers (threads and processes, through a rollout), the migration of schema v1 rows, the retirement
of a rolled-back snapshot and the drop of its late writes (also racing the retirement from another process).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from serving import store_io
from serving.store_io import read_embeddings, read_embeddings_feast, read_history, read_user_features, write_embeddings
from sum_models.shift import POOL_DEPTH
from sum_platform import embedding_row

K, D = 2, 8
USERS_WITH_FEATURES = list(range(0, 60))
UNKNOWN_USER = 999_999


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.slow)])
def feast_env(request, tmp_path_factory, write_online_features):
    """Tmp params (tiny K, D) + workspace whose Feast store is applied and holds users' features; on SQLite,
    then on Redis (the session's redis-server, the ``redis`` profile)."""
    from sum_platform.config import load_params
    from sum_platform.feature_store import apply_definitions, feature_spec

    root = tmp_path_factory.mktemp(f"store_io-{request.param}")
    workspace = root / "workspace"
    raw = yaml.safe_load(Path(os.environ["SUM_PARAMS"]).read_text())  # the session's (its Redis port)
    if request.param == "redis":
        request.getfixturevalue("redis_server")["flush"]()
        raw["profile"] = "redis"
    raw["paths"]["workspace"] = str(workspace)
    raw["model"].update({"num_embeddings": K, "embedding_dim": D})
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))

    mp = pytest.MonkeyPatch()
    mp.setenv("SUM_PARAMS", str(params_file))
    mp.setenv("SUM_WORKSPACE", str(workspace))
    try:
        params = load_params(params_file)
        store = apply_definitions(params)
        spec = feature_spec(params, store)
        users = write_online_features(store, spec, USERS_WITH_FEATURES)
        yield {"params": params, "store": store, "spec": spec, "users": users}
    finally:
        mp.undo()


def test_a_row_keeps_pool_depth_raw_versions_each_with_its_snapshot_id():
    """The stored slots follow the pooling depth of paper §5.2 (current + POOL_DEPTH - 1 cached), each slot with
    the id of the snapshot that computed it."""
    assert POOL_DEPTH == 3
    fields = store_io.history_fields(1)
    assert [f for f in fields if f.endswith("_embedding_0") and not f.startswith("batch")] == [
        "raw_embedding_0", "prev1_embedding_0", "prev2_embedding_0"
    ]
    assert [f for f in fields if f.endswith("snapshot_id") and not f.startswith("batch")] == [
        "snapshot_id", "prev1_snapshot_id", "prev2_snapshot_id"
    ]


def test_packed_value_round_trip():
    emb = np.random.default_rng(3).standard_normal((K, D)).astype(np.float16)
    value = store_io.unpack_value(store_io.pack_value(emb, "snap-\u00e9", 1_700_000_000_123, 3))
    assert value["snapshot_id"] == "snap-\u00e9" and value["written_at_ms"] == 1_700_000_000_123
    assert value["pooled_versions"] == 3 and value["embeddings"].dtype == np.float16
    np.testing.assert_array_equal(value["embeddings"], emb)
    assert store_io.unpack_value(store_io.pack_value(emb, "b", 7, None))["pooled_versions"] is None
    packed = store_io.pack_value(emb, "b", 7, None)
    assert [store_io.unpack_value(bad) for bad in (b"", None, packed[:-1], b"\x02" + packed[1:])] == [None] * 4


def test_packed_fields_agree_with_the_separate_fields_and_old_rows_still_read(feast_env):
    """What SOAP reads (one packed field) is what the separate fields hold; a row written before the packed
    fields existed is read from the separate fields."""
    store = feast_env["store"]
    rng = np.random.default_rng(23)
    users = [800, 801, 802]
    write_embeddings(store, users[:2], rng.standard_normal((2, K, D)).astype(np.float16), "b", 1_000, batch=True)
    write_embeddings(store, users, rng.standard_normal((3, K, D)).astype(np.float16), "s", [2_000, 2_001, 2_002])
    reader = store_io.reader_for(store)
    for source in ("served", "batch"):
        packed = reader.embeddings(users, source)
        separate = reader._unpacked_embeddings(users, source, 30.0)
        assert set(packed) == set(separate) == ({800, 801, 802} if source == "served" else {800, 801})
        for u in packed:
            np.testing.assert_array_equal(packed[u]["embeddings"], separate[u]["embeddings"])
            assert {k: v for k, v in packed[u].items() if k != "embeddings"} == {
                k: v for k, v in separate[u].items() if k != "embeddings"}
    assert reader.embeddings([801])[801]["pooled_versions"] == 2
    served_802 = reader.embeddings([802])[802]["embeddings"].copy()
    # An old row: its packed fields removed from the online store.
    names = list(store_io.PACKED_FIELDS.values())
    if reader.backend == "redis":
        reader.redis.hdel(reader.redis_key(802), *[reader._field_hash(n) for n in names])
    else:
        import sqlite3

        with sqlite3.connect(reader.path) as conn:
            conn.execute(f'DELETE FROM "{reader.table}" WHERE entity_key = ? AND feature_name IN (?, ?)',
                         (reader._key(802), *names))
    assert reader.rows([802], names) == {}
    old = read_embeddings(store, [802, UNKNOWN_USER])
    assert set(old) == {802} and old[802]["written_at_ms"] == 2_002 and old[802]["pooled_versions"] == 1
    np.testing.assert_array_equal(old[802]["embeddings"], served_802)
    # The next write gives it its packed fields again.
    write_embeddings(store, [802], rng.standard_normal((1, K, D)).astype(np.float16), "s", 3_000)
    assert set(reader.rows([802], names)[802]) == set(names)


def test_store_io_round_trip_and_validation(feast_env):
    store = feast_env["store"]
    emb32 = np.random.default_rng(5).standard_normal((2, K, D)).astype(np.float32)
    assert write_embeddings(store, [500, 501], emb32, "probe", 1_700_000_000_000) == 2
    rows = read_embeddings(store, [500, 501, 502])
    assert set(rows) == {500, 501}
    assert rows[500]["snapshot_id"] == "probe" and rows[500]["written_at_ms"] == 1_700_000_000_000
    assert rows[500]["pooled_versions"] == 1
    # Stored values are the fp16 rounding of what was given, exactly.
    np.testing.assert_array_equal(rows[501]["embeddings"], emb32[1].astype(np.float16))
    with pytest.raises(ValueError, match="K="):
        write_embeddings(store, [500], np.zeros((1, K + 1, D), np.float16), "probe")
    with pytest.raises(ValueError, match="NaN/inf"):
        write_embeddings(store, [500], np.full((1, K, D), 1e6, np.float32), "probe")
    with pytest.raises(ValueError, match="non-negative"):
        write_embeddings(store, [-5], np.zeros((1, K, D), np.float16), "probe")
    with pytest.raises(ValueError, match="user ids"):
        write_embeddings(store, [500, 501], np.zeros((1, K, D), np.float16), "probe")

    spec = feast_env["spec"]
    frame, skipped = read_user_features(store, [0, 1, UNKNOWN_USER], spec)
    assert frame["user_id"].tolist() == [0, 1] and skipped == {UNKNOWN_USER: "no_features"}
    # The direct read of the features equals Feast's get_online_features.
    columns = [*spec.user_dense, *spec.user_sparse]
    feast = store.get_online_features(
        features=[f"user_features:{c}" for c in columns], entity_rows=[{"user_id": 0}, {"user_id": 1}]
    ).to_dict()
    for i in range(2):
        for c in spec.user_dense:
            assert frame.loc[i, c] == pytest.approx(feast[c][i])
        for c in spec.user_sparse:
            assert list(frame.loc[i, c]) == list(feast[c][i] or [])


def _mean(vs):
    return np.mean(np.stack([v[0].astype(np.float64) for v in vs]), axis=0).astype(np.float16)


def test_write_pooling_pools_the_current_write_with_the_two_before_it(feast_env):
    """``pool_unit: write`` (what serving did before): every write is a version."""
    store = feast_env["store"]
    rng = np.random.default_rng(11)
    versions = [rng.standard_normal((1, K, D)).astype(np.float16) for _ in range(5)]

    write_embeddings(store, [600], versions[0], "v", 1_000, batch=True, unit="write")
    write_embeddings(store, [600], versions[1], "v", 2_000, unit="write")
    row = read_embeddings(store, [600])[600]
    assert row["pooled_versions"] == 2
    np.testing.assert_array_equal(row["embeddings"], _mean(versions[:2]))
    write_embeddings(store, [600], versions[2], "w", 3_000, unit="write")
    row = read_embeddings(store, [600])[600]
    assert row["pooled_versions"] == 3 and row["snapshot_id"] == "w" and row["written_at_ms"] == 3_000
    np.testing.assert_array_equal(row["embeddings"], _mean(versions[:3]))
    # Per write: a fourth write pushes the first out of the pool, even of the same snapshot.
    write_embeddings(store, [600], versions[3], "w", 4_000, unit="write")
    np.testing.assert_array_equal(read_embeddings(store, [600])[600]["embeddings"], _mean(versions[1:4]))
    # Rewriting the latest version (same snapshot id and time, e.g. a rerun of the daily batch) replaces it.
    write_embeddings(store, [600], versions[4], "w", 4_000, unit="write")
    np.testing.assert_array_equal(
        read_embeddings(store, [600])[600]["embeddings"], _mean([versions[4], versions[2], versions[1]])
    )
    history = read_history(store, [600])[600]
    np.testing.assert_array_equal(history["raw_embedding_0"], versions[4][0, 0].astype(np.float32))
    np.testing.assert_array_equal(history["prev2_embedding_1"], versions[1][0, 1].astype(np.float32))
    assert [history[f] for f in embedding_row.SLOT_ID_FIELDS] == ["w", "w", "v"]
    # The daily batch value is kept apart (offline mode) and carried over by non-batch writes.
    batch = read_embeddings(store, [600], source="batch")[600]
    assert batch["snapshot_id"] == "v" and batch["written_at_ms"] == 1_000
    np.testing.assert_array_equal(batch["embeddings"], versions[0][0])
    # The direct read and Feast's get_online_features see the same row.
    via_feast = read_embeddings_feast(store, [600])[600]
    direct = read_embeddings(store, [600])[600]
    np.testing.assert_array_equal(via_feast["embeddings"], direct["embeddings"])
    assert {k: via_feast[k] for k in ("snapshot_id", "written_at_ms", "pooled_versions")} == {
        k: direct[k] for k in ("snapshot_id", "written_at_ms", "pooled_versions")
    }
    # A new embedding shape (another embedding_dim) starts a fresh history.
    write_embeddings(store, [601], versions[0], "v", 1_000, unit="write")
    write_embeddings(store, [601], np.ones((1, K, D // 2), np.float16), "x", 5_000, unit="write")
    assert read_embeddings(store, [601])[601]["pooled_versions"] == 1


S0, S1, S2, S3 = (f"sum-2026-03-0{i}" for i in range(1, 5))


def _stored(store, uid):
    """``(slots of the stored row, its served value, versions pooled)``."""
    row = read_history(store, [uid])[uid]
    served = read_embeddings(store, [uid])[uid]
    return store_io.row_slots(row, K), served["embeddings"], served["pooled_versions"]


def _assert_served_is_the_pool(store, users):
    for uid in users:
        slots, served, n = _stored(store, uid)
        pooled, n_pooled = embedding_row.pool(slots.values)
        np.testing.assert_array_equal(served, pooled[0])
        assert n == n_pooled[0]


def test_snapshot_pooling_replaces_shifts_lands_late_writes_in_their_slot_and_drops_older_ones(feast_env):
    """``pool_unit: snapshot``: the served value pools the latest version of each of the last 3 snapshots."""
    store = feast_env["store"]
    rng = np.random.default_rng(12)
    v = lambda: rng.standard_normal((1, K, D)).astype(np.float16)  # noqa: E731
    a, b, c, b2, a2, c2, d = v(), v(), v(), v(), v(), v(), v()
    uid = 610
    write_embeddings(store, [uid], a, S0, 1_000, batch=True)
    write_embeddings(store, [uid], b, S1, 2_000)
    write_embeddings(store, [uid], c, S2, 3_000)
    slots, served, n = _stored(store, uid)
    assert list(slots.ids[0]) == [S2, S1, S0] and n == 3
    np.testing.assert_array_equal(served, _mean([c, b, a]))
    # The same snapshot again (fresh features): its slot is replaced, nothing shifts.
    write_embeddings(store, [uid], c2, S2, 4_000)
    slots, served, _ = _stored(store, uid)
    assert list(slots.ids[0]) == [S2, S1, S0] and slots.written_ms[0] == 4_000
    np.testing.assert_array_equal(served, _mean([c2, b, a]))
    # A late write of the previous snapshot (a replica still rolling out): into its own slot, no flap.
    assert write_embeddings(store, [uid], b2, S1, 4_500) == 1
    slots, served, _ = _stored(store, uid)
    assert list(slots.ids[0]) == [S2, S1, S0] and slots.written_ms[0] == 4_000
    assert read_embeddings(store, [uid])[uid]["snapshot_id"] == S2
    np.testing.assert_array_equal(served, _mean([c2, b2, a]))
    # A snapshot older than the row's latest that the row no longer holds would shift the history back: dropped,
    # the row is not rewritten.
    write_embeddings(store, [uid], d, S3, 5_000)
    before = read_history(store, [uid])[uid]
    assert write_embeddings(store, [uid], a2, S0, 6_000) == 0
    after = read_history(store, [uid])[uid]
    assert before.keys() == after.keys()
    for field in before:
        np.testing.assert_array_equal(np.asarray(before[field], dtype=object), np.asarray(after[field], dtype=object))
    slots, served, _ = _stored(store, uid)
    assert list(slots.ids[0]) == [S3, S2, S1]
    np.testing.assert_array_equal(served, _mean([d, c2, b2]))
    # The realtime preview goes through the same rule: a dropped write previews the stored value.
    preview = store_io.pooled_preview(store, [uid], a2, S0, 6_000)[uid]
    np.testing.assert_array_equal(preview[0], served)
    # The daily batch value stays the batch write's.
    batch = read_embeddings(store, [uid], source="batch")[uid]
    assert batch["snapshot_id"] == S0
    np.testing.assert_array_equal(batch["embeddings"], a[0])
    _assert_served_is_the_pool(store, [uid])


def test_a_rerun_of_the_daily_batch_is_idempotent_under_both_units(feast_env):
    store = feast_env["store"]
    rng = np.random.default_rng(13)
    for unit, uid in (("snapshot", 620), ("write", 621)):
        first = rng.standard_normal((1, K, D)).astype(np.float16)
        batch = rng.standard_normal((1, K, D)).astype(np.float16)
        write_embeddings(store, [uid], first, S0, 1_000, unit=unit)
        write_embeddings(store, [uid], batch, S1, 2_000, batch=True, unit=unit)
        once = read_history(store, [uid])[uid]
        write_embeddings(store, [uid], batch, S1, 2_000, batch=True, unit=unit)
        twice = read_history(store, [uid])[uid]
        assert twice["pooled_versions"] == once["pooled_versions"] == 2
        np.testing.assert_array_equal(twice["embedding_0"], once["embedding_0"])
        np.testing.assert_array_equal(twice["batch_embedding_1"], _mean([batch, first])[1].astype(np.float32))


def test_one_write_of_versions_computed_at_different_times_keeps_each_time(feast_env):
    """The compute deployment writes the realtime versions of a window together: each row keeps the write time
    it was computed (and answered) with, and pools exactly as a write of its own would."""
    store = feast_env["store"]
    rng = np.random.default_rng(17)
    users, times = [720, 721, 722], [5_000, 5_007, 5_013]
    emb = rng.standard_normal((3, K, D)).astype(np.float16)
    write_embeddings(store, [721], rng.standard_normal((1, K, D)).astype(np.float16), "v", 1_000)  # 721 has history
    alone = {u: read_embeddings(store, [u]).get(u) for u in users}
    assert write_embeddings(store, users, emb, "w", times, to_offline=True) == 3
    rows = read_embeddings(store, users)
    assert [rows[u]["written_at_ms"] for u in users] == times
    assert [rows[u]["pooled_versions"] for u in users] == [1, 2, 1]
    expected_721 = np.mean([alone[721]["embeddings"].astype(np.float64), emb[1].astype(np.float64)], axis=0)
    np.testing.assert_array_equal(rows[721]["embeddings"], expected_721.astype(np.float16))
    np.testing.assert_array_equal(rows[720]["embeddings"], emb[0])
    with pytest.raises(ValueError, match="2 write times for 3 rows"):
        write_embeddings(store, users, emb, "w", times[:2])


def test_concurrent_writers_never_lose_a_version(feast_env):
    """The read-modify-write is atomic (SQLite: a file lock; Redis: WATCH / MULTI / EXEC): 4 threads x 5 writes
    of distinct values to the same users, under write pooling (every write a version). Each write pools what it
    read: a lost update would show as two writes
    that read the same previous version. So the writes form one chain: every write's previous version is a
    distinct one (the first write's is empty), and the last three of the chain are what is stored."""
    store = feast_env["store"]
    users = [700, 701]
    frames = []

    def writer(i: int):
        for j in range(5):
            value = i * 10 + j + 1
            frames.append(write_embeddings(store, users, np.full((2, K, D), value, np.float16), f"t{i}",
                                           10_000 + i * 100 + j, return_frame=True, unit="write"))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, uid in enumerate(users):
        raws = [float(f["raw_embedding_0"].iloc[n][0]) for f in frames]
        prevs = [float(f["prev1_embedding_0"].iloc[n][0]) if len(f["prev1_embedding_0"].iloc[n]) else None
                 for f in frames]
        assert len(set(raws)) == 20 and len(set(prevs)) == 20, (raws, prevs)  # no two writes read the same row
        assert prevs.count(None) == 1 and set(prevs) - {None} < set(raws)
        # Follow the chain from the first write to the last: it visits every write.
        after = dict(zip(prevs, raws))
        chain, cur = [], after[None]
        while cur is not None:
            chain.append(cur)
            cur = after.get(cur)
        assert len(chain) == 20
        row = read_history(store, [uid])[uid]
        assert row["pooled_versions"] == 3
        stored = [float(row[f"{slot}_embedding_0"][0]) for slot in ("raw", "prev1", "prev2")]
        assert stored == chain[::-1][:3]


_WRITER = """
import pickle, sys
import numpy as np
from serving.store_io import write_embeddings
from sum_platform.config import load_params
from sum_platform.feature_store import get_store
params_file, out, snapshot, base, count, k, d = sys.argv[1:8]
users = [int(u) for u in sys.argv[8].split(",")]
store = get_store(load_params(params_file))
frames = []
for j in range(int(count)):
    value = int(base) + j
    frames.append(write_embeddings(store, users, np.full((len(users), int(k), int(d)), value, np.float16), snapshot,
                                   20_000 + value, return_frame=True))
with open(out, "wb") as f:
    pickle.dump(frames, f)
"""


def _frame_slots(frame):
    """The slots of each row of a written frame, and its served value."""
    rows = frame.to_dict("records")
    slots = embedding_row.as_slots(rows, K, D)
    served = np.stack([np.stack([np.asarray(r[f"embedding_{j}"]) for j in range(K)]) for r in rows])
    return slots, served.astype(np.float16)


@pytest.mark.slow  # three Python processes importing Feast: over a minute on a busy 2-core machine
def test_concurrent_processes_through_a_rollout_lose_no_version_and_never_flap(feast_env, tmp_path):
    """Snapshot pooling under 3 writer processes on the same users: two replicas of the new snapshot S2 and a late
    replica still writing S1 (a rollout). Every written row serves the pool of its slots, its history is
    [S1, S0] before S2's first write and [S2, S1, S0] after it, never [S1, S2, ..] (no flap), and the store ends
    with S2's last write, S1's last late write (in S1's own slot: no lost version) and S0 untouched."""
    store = feast_env["store"]
    users = [650, 651, 652]
    write_embeddings(store, users, np.zeros((3, K, D), np.float16), S0, 1_000)
    write_embeddings(store, users, np.ones((3, K, D), np.float16), S1, 2_000)
    params_file = os.environ["SUM_PARAMS"]
    writers = [(S2, 100), (S2, 200), (S1, 300)]
    procs = []
    for i, (snap, base) in enumerate(writers):
        out = tmp_path / f"writer{i}.pkl"
        procs.append((out, subprocess.Popen([sys.executable, "-c", _WRITER, params_file, str(out), snap, str(base), "8",
                                             str(K), str(D), ",".join(map(str, users))])))
    for _, proc in procs:
        assert proc.wait(timeout=300) == 0
    frames = [f for out, _ in procs for f in pickle.loads(out.read_bytes())]
    assert sum(len(f) for f in frames) == 3 * 8 * len(users)  # none dropped: S1 is still in every row
    for frame in frames:
        slots, served = _frame_slots(frame)
        np.testing.assert_array_equal(served, embedding_row.pool(slots.values)[0])
        for ids in slots.ids.tolist():
            assert ids in ([S1, S0, None], [S2, S1, S0]), ids
    for uid in users:
        slots, _, n = _stored(store, uid)
        assert list(slots.ids[0]) == [S2, S1, S0] and n == 3
        assert slots.values[0, 0, 0, 0] in (107, 207)  # the last write of one of S2's replicas
        assert slots.values[0, 1, 0, 0] == 307  # the late replica's last write, in S1's slot
        assert slots.values[0, 2, 0, 0] == 0
    _assert_served_is_the_pool(store, users)


def _remove_fields(reader, users, names):
    """Deletes fields of users' rows from the online store (what a row written before they existed lacks)."""
    if reader.backend == "redis":
        for u in users:
            reader.redis.hdel(reader.redis_key(u), *[reader._field_hash(n) for n in names])
    else:
        import sqlite3

        with sqlite3.connect(reader.path) as conn:
            conn.executemany(f'DELETE FROM "{reader.table}" WHERE entity_key = ? AND feature_name IN (?, ?)',
                             [(reader._key(u), *names) for u in users])


def test_rows_of_the_v1_layout_are_migrated_without_changing_a_served_value(feast_env):
    """Rows written by the old writer (every write a version, no per-slot snapshot ids) get their ids from
    ``migrate_rows``: served and batch values byte for byte as they were, ids by the migration rule, a second run
    changes nothing; the next snapshot write keeps one version per snapshot."""
    store = feast_env["store"]
    reader = store_io.reader_for(store)
    rng = np.random.default_rng(14)
    x, y, z, c = (rng.standard_normal((1, K, D)).astype(np.float16) for _ in range(4))
    for t, (uid, value, snap) in enumerate([(630, x, S0), (630, x, S0), (630, y, S1),   # [y, x, x]
                                            (631, y, S1), (631, y, S1), (631, y, S1),   # [y, y, y]
                                            (632, x, S0), (632, y, S1), (632, z, S2),   # [z, y, x]
                                            (633, x, S0)]):                             # [x]: nothing older
        write_embeddings(store, [uid], value, snap, 1_000 + t, batch=(uid == 632 and t == 7), unit="write")
    users = [630, 631, 632, 633]
    _remove_fields(reader, users, list(embedding_row.SLOT_ID_FIELDS[1:]))
    count, examples = store_io.v1_row_count(store)
    assert count == 3 and set(examples) == {630, 631, 632}
    value_fields = [*store_io.served_fields(K), *store_io.batch_fields(K), *store_io.PACKED_FIELDS.values(),
                    *(f"{s}_embedding_{j}" for s in embedding_row.SLOTS for j in range(K))]
    before = reader.rows(users, value_fields)

    out = store_io.migrate_rows(store)
    assert out["migrated"] == 3 and out["rows"] >= 4
    after = reader.rows(users, value_fields)
    for uid in users:
        for field in value_fields:
            b, a = before[uid][field], after[uid][field]
            if isinstance(b, np.ndarray):
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (uid, field)
            else:
                assert a == b, (uid, field)
    ids = {u: [read_history(store, [u])[u][f] for f in embedding_row.SLOT_ID_FIELDS] for u in users}
    U = embedding_row.UNKNOWN_SNAPSHOT
    assert ids == {630: [S1, U, U], 631: [S1, S1, S1], 632: [S2, U, U], 633: [S0, None, None]}
    assert store_io.v1_row_count(store)[0] == 0
    assert store_io.migrate_rows(store)["migrated"] == 0  # idempotent
    assert reader.rows(users, value_fields).keys() == after.keys()
    _assert_served_is_the_pool(store, users)
    # The next snapshot write: copies of a version are one version, the unrecorded distinct one stays.
    write_embeddings(store, [630, 631], np.stack([c[0], c[0]]), S2, 9_000)
    assert list(_stored(store, 630)[0].ids[0]) == [S2, S1, U]
    assert list(_stored(store, 631)[0].ids[0]) == [S2, S1, None]
    _assert_served_is_the_pool(store, [630, 631])


def test_a_rolled_back_snapshot_is_retired_from_every_row(feast_env):
    """Rollback from S2 to S1: S2's versions leave every row (older ones move up, the served value is pooled
    again); later writes of S1 land in S1's own slot, and S2 is in no served pool."""
    store = feast_env["store"]
    S0, S1, S2 = (f"sum-2026-04-0{i}" for i in range(1, 4))  # snapshots of this test's rows only
    rng = np.random.default_rng(15)
    a, b, c, b2 = (rng.standard_normal((2, K, D)).astype(np.float16) for _ in range(4))
    write_embeddings(store, [660, 661], a, S0, 1_000)
    write_embeddings(store, [660, 661], b, S1, 2_000)
    write_embeddings(store, [660, 662], c, S2, 3_000)  # 661 never got S2; 662 only S2
    untouched = read_history(store, [661])[661]

    out = store_io.retire_snapshot(store, S2)
    assert out["retired"] == 2
    slots, served, n = _stored(store, 660)
    assert list(slots.ids[0]) == [S1, S0, None] and n == 2
    np.testing.assert_array_equal(served, _mean([b[:1], a[:1]]))
    assert 662 not in read_embeddings(store, [662])  # nothing left to serve until its next write
    assert read_history(store, [661])[661]["written_at_ms"] == untouched["written_at_ms"]
    assert store_io.retire_snapshot(store, S2)["retired"] == 0
    # The restored production's next write lands in its own slot.
    write_embeddings(store, [660, 662], b2, S1, 4_000)
    assert list(_stored(store, 660)[0].ids[0]) == [S1, S0, None]
    assert list(_stored(store, 662)[0].ids[0]) == [S1, None, None]
    np.testing.assert_array_equal(_stored(store, 660)[1], _mean([b2[:1], a[:1]]))
    _assert_served_is_the_pool(store, [660, 661, 662])


def test_a_late_write_of_a_retired_snapshot_is_dropped_until_it_is_promoted_again(feast_env):
    """After a rollback retires R2, an old replica's late write of R2 (newer than the restored R1, so it would shift
    the history) is dropped: the row and its served value stay as they were. R1's writes still land. Reinstating R2
    (a promotion of it again) lets its writes land again."""
    store = feast_env["store"]
    R0, R1, R2 = (f"sum-2026-05-0{i}" for i in range(1, 4))  # snapshots of this test's rows only
    users = [670, 671]
    rng = np.random.default_rng(16)
    a, b, c, late, b2, again = (rng.standard_normal((2, K, D)).astype(np.float16) for _ in range(6))
    write_embeddings(store, users, a, R0, 1_000)
    write_embeddings(store, users, b, R1, 2_000)
    write_embeddings(store, users, c, R2, 3_000)
    assert store_io.retire_snapshot(store, R2)["retired"] == 2
    assert R2 in store_io.retired_snapshots(store)
    before = read_history(store, users)
    served = read_embeddings(store, users)

    assert write_embeddings(store, users, late, R2, 4_000) == 0
    assert len(write_embeddings(store, users, late, R2, 4_001, return_frame=True)) == 0
    after = read_history(store, users)
    for uid in users:
        assert list(_stored(store, uid)[0].ids[0]) == [R1, R0, None]
        for field, value in before[uid].items():
            np.testing.assert_array_equal(np.asarray(after[uid][field]), np.asarray(value), err_msg=field)
        np.testing.assert_array_equal(read_embeddings(store, [uid])[uid]["embeddings"], served[uid]["embeddings"])

    # The restored production's writes land in its own slot.
    assert write_embeddings(store, users, b2, R1, 5_000) == 2
    assert list(_stored(store, 670)[0].ids[0]) == [R1, R0, None]
    np.testing.assert_array_equal(_stored(store, 670)[1], _mean([b2[:1], a[:1]]))

    # Promoted again: R2 is no longer retired and its next write shifts the history as a new snapshot's does.
    assert store_io.reinstate_snapshot(store, R2) is True
    assert R2 not in store_io.retired_snapshots(store)
    assert store_io.reinstate_snapshot(store, R2) is False
    assert write_embeddings(store, users, again, R2, 6_000) == 2
    assert list(_stored(store, 670)[0].ids[0]) == [R2, R1, R0]
    np.testing.assert_array_equal(_stored(store, 670)[1], _mean([again[:1], b2[:1], a[:1]]))
    _assert_served_is_the_pool(store, users)


_LATE_REPLICA = """
import sys
import numpy as np
from serving.store_io import write_embeddings
from sum_platform.config import load_params
from sum_platform.feature_store import get_store
params_file, progress, stop, snapshot, k, d = sys.argv[1:7]
users = [int(u) for u in sys.argv[7].split(",")]
store = get_store(load_params(params_file))
j = 0
with open(progress, "a") as out:
    while True:
        stopping = __import__("os").path.exists(stop)  # one last write after the stop is asked
        written = write_embeddings(store, users, np.full((len(users), int(k), int(d)), 100 + j % 100, np.float16),
                                   snapshot, 50_000 + j)
        out.write(f"{j} {written}\\n")
        out.flush()
        j += 1
        if stopping:
            break
"""


def _progress(path):
    lines = path.read_text().splitlines() if path.exists() else []
    return [tuple(map(int, line.split())) for line in lines if line.count(" ") == 1]


def _wait_for(what, timeout_s=300.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "the writer process made no progress"
        time.sleep(0.05)


@pytest.mark.slow  # a second Python process importing Feast
def test_a_retirement_racing_an_old_replica_leaves_no_row_holding_the_snapshot(feast_env, tmp_path):
    """A process writing X in a loop (a replica still running the rolled-back snapshot) while this process retires
    X: once the retirement has returned and the writer's last write has returned, no row holds X; the rows serve
    the pool of the restored production's versions, and the writer's writes after the retirement were dropped."""
    store = feast_env["store"]
    P0, P1, X = (f"sum-2026-06-0{i}" for i in range(1, 4))  # X is newer than the restored production P1
    users = list(range(680, 690))
    write_embeddings(store, users, np.zeros((len(users), K, D), np.float16), P0, 1_000)
    write_embeddings(store, users, np.ones((len(users), K, D), np.float16), P1, 2_000)
    progress, stop = tmp_path / "progress.txt", tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", _LATE_REPLICA, os.environ["SUM_PARAMS"], str(progress), str(stop),
                             X, str(K), str(D), ",".join(map(str, users))])
    try:
        _wait_for(lambda: any(n for _, n in _progress(progress)))  # X is in the rows
        assert store_io.retire_snapshot(store, X)["retired"] == len(users)
        at_retirement = len(_progress(progress))
        _wait_for(lambda: len(_progress(progress)) >= at_retirement + 3 or proc.poll() is not None)
        stop.touch()
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for uid in users:
        slots, served, n = _stored(store, uid)
        assert list(slots.ids[0]) == [P1, P0, None] and n == 2
        np.testing.assert_array_equal(served, np.full((K, D), 0.5, np.float16))
    _assert_served_is_the_pool(store, users)
    # Write j + 1 started after write j's line: the writes begun after the retirement returned were all dropped.
    done = _progress(progress)
    assert len(done) >= at_retirement + 4
    assert [n for _, n in done[at_retirement + 1:]] == [0] * len(done[at_retirement + 1:])


def test_a_point_in_time_retrieval_never_returns_an_embedding_written_after_the_impression(feast_env):
    """Every write is logged offline with its time; Feast's historical join gives each impression the latest
    write at or before it (what serving returned then), never a later one, and nothing before the first."""
    import pandas as pd

    from sum_platform.feature_store import historical_embeddings

    store, users = feast_env["store"], [40, 41]
    t0 = pd.Timestamp("2026-02-01 10:00", tz="UTC")
    rng = np.random.default_rng(21)
    writes = [  # (minutes after t0, snapshot, batch?)
        (0, "sum-a", True), (30, "sum-b", False), (90, "sum-c", False),
    ]
    versions = {}
    for minutes, snap, batch in writes:
        emb = rng.standard_normal((len(users), K, D)).astype(np.float16)
        rows = write_embeddings(store, users, emb, snap, t0 + pd.Timedelta(minutes=minutes), batch=batch,
                                to_offline=True, return_frame=True)
        versions[snap] = {int(r.user_id): np.asarray(r.embedding_0) for r in rows.itertuples()}
    impressions = pd.DataFrame({
        "user_id": [40, 40, 41, 40, 41, 40],
        "event_ts": t0 + pd.to_timedelta([-1, 0, 29, 30, 89, 500], unit="min"),
        "impression_id": list("abcdef"),
    })
    got = historical_embeddings(store, impressions, K)
    assert got["impression_id"].tolist() == list("abcdef")  # the caller's rows, in their order
    expected = [None, "sum-a", "sum-a", "sum-b", "sum-b", "sum-c"]
    assert got["embedding_snapshot_id"].where(got["embedding_snapshot_id"].notna(), None).tolist() == expected
    assert got.loc[0, "embedding_0"] is None
    written = pd.to_datetime(got["embedding_written_at_ms"].dropna(), unit="ms", utc=True)
    assert (written <= got.loc[written.index, "event_ts"]).all()
    for i in (1, 3, 5):  # the served (pooled) value exactly as written then
        np.testing.assert_array_equal(np.asarray(got.loc[i, "embedding_0"]), versions[expected[i]][40])
    # Offline mode's column: the daily batch value stays the batch write's after later write-backs.
    batch = historical_embeddings(store, impressions, K, source="batch")
    assert batch["embedding_snapshot_id"].tolist()[1:] == ["sum-a"] * 5


@pytest.mark.parametrize("feast_env", ["sqlite"], indirect=True)  # a Redis store has no file to replace
def test_a_replaced_store_file_is_noticed_and_a_client_reopens_it(feast_env, tmp_path):
    """A rebuilt online store is a new file at the same path: readers (and Feast's cached connection) still hold
    the old one until the serving replicas' health checks reopen it."""
    import os

    from serving.client import SoapClient
    from serving.settings import ingress_user_config
    from sum_platform.feature_store import apply_definitions, get_store

    store = feast_env["store"]
    reader = store_io.reader_for(store)
    assert reader.backend == "sqlite"
    write_embeddings(store, [900], np.ones((1, K, D), np.float16), "before", 1_000)
    client = SoapClient(store, object(), ingress_user_config(feast_env["params"]), max_inflight=8)
    assert not client.reopen_store_if_replaced(lambda: get_store(feast_env["params"]))
    os.replace(reader.path, tmp_path / "aside.db")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{reader.path}{suffix}"):
            os.replace(f"{reader.path}{suffix}", tmp_path / f"aside.db{suffix}")
    fresh = apply_definitions(feast_env["params"])
    write_embeddings(fresh, [900], np.full((1, K, D), 2, np.float16), "after", 2_000)
    assert reader.replaced()
    assert client.reopen_store_if_replaced(lambda: get_store(feast_env["params"]))
    assert client._reader.embeddings([900])[900]["snapshot_id"] == "after" and not client._reader.replaced()


def test_a_failing_store_is_logged_once_per_interval_with_the_count_left_out(caplog, monkeypatch):
    from serving import client

    now = [100.0]
    monkeypatch.setattr(client.time, "monotonic", lambda: now[0])
    throttled = client._ThrottledError(every_s=10.0)
    with caplog.at_level("ERROR", logger=client.log.name):
        for _ in range(500):  # one second of failed reads
            throttled.log("online store read failed for %d users: %s", 1, "database disk image is malformed")
            now[0] += 0.002
        now[0] = 111.0
        throttled.log("online store read failed for %d users: %s", 1, "database disk image is malformed")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["online store read failed for 1 users: database disk image is malformed",
                     "online store read failed for 1 users: database disk image is malformed (and 499 more in the "
                     "last 11 s)"]
