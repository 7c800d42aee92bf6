"""The ``sum_embeddings`` row's owner (``sum_platform.embedding_row``): the pooling rule in arrays, no store.

Golden cases of the rule (replace, shift, a late write into its own slot, drop), both pool units, the schema v1
migration, a rollback's retirement, the pool bit-identical to ``sum_models.shift.average_pool``, and a check that
fails if a second definition of the row (its field spellings or a pooling mean) appears in the project's source.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

from sum_models.shift import POOL_DEPTH, average_pool
from sum_platform import embedding_row as row
from sum_platform.embedding_row import UNKNOWN_SNAPSHOT as U
from sum_platform.embedding_row import Slots, drop_snapshot, migrate_ids, pool, shift_in, v1_rows

K, D = 2, 4
S0, S1, S2, S3 = (f"sum-2026-05-0{i}" for i in range(1, 5))


def v(x: float, n: int = 1) -> np.ndarray:
    """``n`` users' version, every coordinate ``x`` (fp16 [n, K, D])."""
    return np.full((n, K, D), x, np.float16)


def history(*versions: tuple[float, str], written_ms: int = 0) -> Slots:
    """One user's row, latest first: ``(value, snapshot id)`` per slot."""
    out = Slots.empty(1, K, D)
    for s, (x, sid) in enumerate(versions):
        out.values[0, s], out.ids[0, s] = x, sid
    out.written_ms[0] = written_ms
    return out


def content(slots: Slots) -> list[tuple[float, str]]:
    """The first user's slots as ``(value, id)``, empty ones left out."""
    return [(float(slots.values[0, s, 0, 0]), slots.ids[0, s]) for s in range(slots.ids.shape[1])
            if slots.ids[0, s] is not None]


def served(slots: Slots) -> float:
    return float(pool(slots.values)[0][0, 0, 0])


# ---------------------------------------------------------------------------------------------------- the rule

def test_snapshot_pooling_golden_sequence():
    """A day of serving under ``snapshot``: S1's writes replace its slot, S2's first write shifts, a late S1 write
    (a replica still rolling out) lands in S1's slot, a write of a snapshot older than the row's latest that the row
    no longer holds is dropped; the served value is always the mean of one version per snapshot."""
    rows = Slots.empty(1, K, D)
    steps = [  # (value, snapshot, expected slots after, landed)
        (1, S0, [(1, S0)], 0),
        (2, S1, [(2, S1), (1, S0)], 0),
        (3, S1, [(3, S1), (1, S0)], 0),                     # fresh features, same version: replaced
        (4, S1, [(4, S1), (1, S0)], 0),
        (8, S2, [(8, S2), (4, S1), (1, S0)], 0),            # a new snapshot shifts the history
        (5, S1, [(8, S2), (5, S1), (1, S0)], 1),            # late write of S1: its own slot, no flap
        (9, S2, [(9, S2), (5, S1), (1, S0)], 0),
        (16, S3, [(16, S3), (9, S2), (5, S1)], 0),          # S0 leaves the pool
        (7, S0, [(16, S3), (9, S2), (5, S1)], -1),          # older than every version held: dropped
    ]
    for t, (x, sid, expected, landed) in enumerate(steps):
        rows, where = shift_in(rows, v(x), sid, 100 + t, "snapshot")
        assert content(rows) == [(float(a), b) for a, b in expected], (t, x, sid)
        assert int(where[0]) == landed
        assert served(rows) == np.float16(np.mean([a for a, _ in expected]))
    assert rows.written_ms[0] == 100 + 7  # slot 0's write time; the late and the dropped writes leave it


def test_write_pooling_golden_sequence():
    """``write``: every write is a version (what serving did before), except a rerun of the same write."""
    rows = Slots.empty(1, K, D)
    for t, (x, sid) in enumerate([(1, S0), (2, S1), (3, S1), (4, S1)]):
        rows, where = shift_in(rows, v(x), sid, 100 + t, "write")
        assert int(where[0]) == 0
    assert content(rows) == [(4.0, S1), (3.0, S1), (2.0, S1)]  # three writes of one snapshot: no pooling across days
    rows, _ = shift_in(rows, v(5), S1, 103, "write")  # the same snapshot and write time: a rerun replaces
    assert content(rows) == [(5.0, S1), (3.0, S1), (2.0, S1)]
    rows, where = shift_in(rows, v(6), S0, 104, "write")  # no drop under write pooling
    assert int(where[0]) == 0 and content(rows)[0] == (6.0, S0)


def test_a_row_written_under_write_pooling_keeps_one_version_per_snapshot_at_its_first_snapshot_write():
    rows = history((4, S1), (3, S1), (2, S0))
    after, _ = shift_in(rows, v(5), S1, 1, "snapshot")
    assert content(after) == [(5.0, S1), (2.0, S0)]


def test_many_users_at_once_each_follow_the_rule():
    """One call for a population: each row takes its own branch (the study pools a whole day in one call)."""
    rows = Slots.empty(4, K, D)
    rows.values[0, 0], rows.ids[0, 0] = 1, S1                       # same snapshot: replace
    rows.values[1, 0], rows.ids[1, 0] = 1, S0                       # older snapshot in slot 0: shift
    rows.values[2, :2], rows.ids[2, :2] = [[[2]], [[1]]], [S2, S1]  # S1 in slot 1: late write lands there
    rows.values[3, 0], rows.ids[3, 0] = 3, S3                       # newer than S1, S1 not held: drop
    out, landed = shift_in(rows, v(9, 4), S1, np.arange(4), "snapshot")
    assert landed.tolist() == [0, 0, 1, -1]
    assert out.ids.tolist() == [[S1, None, None], [S1, S0, None], [S2, S1, None], [S3, None, None]]
    np.testing.assert_array_equal(out.values[3], rows.values[3])
    assert out.written_ms.tolist() == [0, 1, -1, -1]


def test_a_bad_unit_or_shape_is_refused():
    with pytest.raises(ValueError, match="pool unit"):
        shift_in(Slots.empty(1, K, D), v(1), S0, 1, "day")
    with pytest.raises(ValueError, match="new versions"):
        shift_in(Slots.empty(2, K, D), v(1), S0, 1)


# ---------------------------------------------------------------------------------------------------- pooling

def test_pool_is_bit_identical_to_average_pool_of_the_present_versions():
    rng = np.random.default_rng(3)
    values = rng.standard_normal((50, POOL_DEPTH, K, D)).astype(np.float16)
    depth = rng.integers(1, POOL_DEPTH + 1, size=50)
    for i, n in enumerate(depth):
        values[i, n:] = np.nan
    pooled, n_pooled = pool(values)
    assert pooled.dtype == np.float16 and n_pooled.tolist() == depth.tolist()
    for i, n in enumerate(depth):
        expected = average_pool([values[i, s] for s in range(n)])
        assert pooled[i].tobytes() == expected.tobytes()
    empty, none = pool(np.full((1, POOL_DEPTH, K, D), np.nan, np.float16))
    assert np.isnan(empty).all() and none.tolist() == [0]


def test_served_after_promotion_per_unit():
    hist = history((3, S2), (2, S1), (1, S0))
    cand = v(10)
    by_snapshot = row.served_after_promotion(hist, cand, S3, "snapshot")
    assert by_snapshot.tobytes() == average_pool([cand[0], v(3)[0], v(2)[0]]).reshape(1, K, D).tobytes()
    by_write = row.served_after_promotion(hist, cand, S3, "write")
    assert by_write.tobytes() == cand.tobytes()  # three requests later: the raw candidate


# ---------------------------------------------------------------------------------------------------- migration

def test_v1_rows_get_ids_by_the_migration_rule_and_no_value_moves():
    """Schema v1 (older slots without ids, written under write pooling): an older slot equal to a newer one gets
    that slot's id, a distinct one the unknown id; values stay, so the pool does; a second run changes nothing."""
    rows = Slots.empty(4, K, D)
    layouts = [[(2, S1), (1, None), (1, None)],   # [y, x, x]
               [(2, S1), (2, None), (2, None)],   # [y, y, y]
               [(3, S2), (2, None), (1, None)],   # [z, y, x]
               [(1, S0)]]                         # nothing older: not v1
    for r, layout in enumerate(layouts):
        for s, (x, sid) in enumerate(layout):
            rows.values[r, s], rows.ids[r, s] = x, sid
    assert v1_rows(rows).tolist() == [True, True, True, False]
    migrated = migrate_ids(rows)
    assert migrated.ids.tolist() == [[S1, U, U], [S1, S1, S1], [S2, U, U], [S0, None, None]]
    assert migrated.values.tobytes() == rows.values.tobytes()
    assert pool(migrated.values)[0].tobytes() == pool(rows.values)[0].tobytes()
    assert not v1_rows(migrated).any()
    again = migrate_ids(migrated)
    assert again.ids.tolist() == migrated.ids.tolist() and again.values.tobytes() == migrated.values.tobytes()
    # The next snapshot write keeps one version per snapshot: copies merge, the unknown distinct one stays.
    after, _ = shift_in(rows, v(9, 4), S3, 1, "snapshot")
    assert after.ids.tolist() == [[S3, S1, U], [S3, S1, None], [S3, S2, U], [S3, S0, None]]


# ---------------------------------------------------------------------------------------------------- rollback

def test_drop_snapshot_retires_a_rolled_back_snapshot():
    rows = Slots.empty(3, K, D)
    rows.values[0], rows.ids[0] = [[[3]], [[2]], [[1]]], [S2, S1, S0]
    rows.values[1, 0], rows.ids[1, 0] = 3, S2
    rows.values[2, :2], rows.ids[2, :2] = [[[2]], [[1]]], [S1, S0]
    out, changed = drop_snapshot(rows, S2)
    assert changed.tolist() == [True, True, False]
    assert out.ids.tolist() == [[S1, S0, None], [None, None, None], [S1, S0, None]]
    assert float(pool(out.values)[0][0, 0, 0]) == 1.5 and pool(out.values)[1].tolist() == [2, 0, 2]
    # The restored production's next writes land in its own slot; S2 is in no pool.
    after, landed = shift_in(out, v(7, 3), S1, 5, "snapshot")
    assert landed.tolist() == [0, 0, 0]
    assert after.ids.tolist() == [[S1, S0, None], [S1, None, None], [S1, S0, None]]


# ---------------------------------------------------------------------------------------------------- one owner

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OWNERS = {"sum_platform/embedding_row.py", "sum_models/shift.py"}
#: Spellings of the row's fields a second definition would need (in a string of the code: a slot's field, a slot's
#: snapshot id, a packed field, a batch field).
FIELD_SPELLINGS = re.compile(r"prev\d_embedding|raw_embedding|prev\d_snapshot_id|batch_embedding_|^\w+_packed$")
#: A mean over what reads as embedding versions (pooling by hand).
POOLING_WORDS = re.compile(r"version|slot|prev", re.IGNORECASE)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module and its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def second_definitions(root: Path = PROJECT_ROOT) -> list[str]:
    """Places in the project's source (not tests, not .venv) that spell a field of the row in a string of the code or
    pool embedding versions (``average_pool``, or a mean over versions), outside the row's owner and
    ``sum_models/shift.py``. Readers name fields through the owner's functions (``history_fields``,
    ``batch_fields``, ``PACKED_FIELDS`` ...)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in OWNERS or rel.split("/")[0] in ("tests", "docs") or any(p.startswith(".") for p in rel.split("/")):
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if m := FIELD_SPELLINGS.search(node.value):
                    found.append(f"{rel}:{node.lineno} spells {m.group(0)!r}")
            elif isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.split(".")[-1] == "average_pool" or (
                        name.split(".")[-1] in ("mean", "nanmean", "average") and POOLING_WORDS.search(ast.unparse(node))):
                    found.append(f"{rel}:{node.lineno} pools with {name}")
    return found


def test_the_row_has_one_owner():
    assert second_definitions() == []


def test_the_owner_check_sees_a_second_definition(tmp_path):
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "rogue.py").write_text(
        '"""Docstrings may name prev1_embedding_0."""\n'
        'FIELDS = ["prev1_embedding_0", "served_packed"]\n'
        "def pool(versions):\n    return np.mean(np.stack(versions), axis=0)\n"
        "def pool2(vs):\n    return average_pool(vs)\n"
        "def fine(losses):\n    return np.mean(losses)\n")
    (tmp_path / "sum_platform").mkdir()
    (tmp_path / "sum_platform" / "embedding_row.py").write_text('SLOTS = ("raw", "prev1_embedding")\n')
    found = second_definitions(tmp_path)
    assert len(found) == 4, found
    assert all(f.startswith("serving/rogue.py") for f in found)


def test_snapshot_is_older_on_an_array_agrees_with_each_id_alone():
    from sum_platform.embedding_row import UNKNOWN_SNAPSHOT, snapshot_is_older

    than = np.array([["sum-2026-01-02", None], [UNKNOWN_SNAPSHOT, "sum-2026-01-01"], ["sum-2026-01-03", "x"]],
                    dtype=object)
    got = snapshot_is_older("sum-2026-01-02", than)
    assert got.shape == than.shape and got.dtype == bool
    assert got.tolist() == [[snapshot_is_older("sum-2026-01-02", o) for o in row] for row in than.tolist()]
    assert got.tolist() == [[False, False], [False, False], [True, False]]
    assert snapshot_is_older("no-date", than).tolist() == [[False] * 2] * 3
    assert snapshot_is_older("sum-2026-01-02", np.full((2, 3), None, dtype=object)).tolist() == [[False] * 3] * 2
