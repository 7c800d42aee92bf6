"""The ``sum_embeddings`` row: its fields, its packing and the pooling rule. The one owner of all three.

Every writer and every reader of what serving hands downstream goes through this module: the SOAP
write-backs and the realtime preview (``serving/store_io.py``), the daily batch, the gate's "served after
promotion" (``validation/gate.py``), the study's in-memory replay (``sum_pipeline/study.py``) and
``doctor``'s consistency check. ``tests/unit/test_embedding_row.py`` fails if a second definition appears.

The pooling rule (paper §5.2, "average pooling over the 2 most recent cached embeddings and the current
computed embedding"; Table 3 pools *versions produced by snapshots from consecutive dates*). A row keeps
``POOL_DEPTH`` slots, latest first, each a raw fp16 ``[K, D]`` value with the id of the snapshot that computed
it; the served value is the fp16 mean (computed in float64) of the non-empty slots. With
``pool_unit = "snapshot"`` (the default, and this project's reading of the paper) a write of snapshot ``s``

* **replaces** the slot holding ``s`` -- slot 0 for the production snapshot (fresh features, same version), an
  older slot for a late write of a previous snapshot by a replica still rolling out (it lands in its own slot:
  the history never flaps ``[new, old, new]``);
* is **dropped** when ``s`` is not in the row and is older than slot 0's snapshot (by the date in the ids);
* otherwise **shifts** the history: ``prev2 <- prev1 <- slot 0 <- new``.

With ``pool_unit = "write"`` (what serving did before: every write is a version) each write shifts, except one
with slot 0's snapshot id *and* write time (a rerun of the same write, replaced: reruns stay idempotent).

Under ``snapshot`` pooling a row holds one version per snapshot: before a write, an older slot that repeats a
newer one (the same snapshot id; for an unrecorded id, the same value) is emptied and the survivors move up
(:func:`one_version_per_snapshot`). That is what a row written under ``write`` pooling (copies of one snapshot's
version) becomes at its first ``snapshot`` write, so the switch can be flipped on a live store.

Rows written before the slots carried snapshot ids (schema v1: only slot 0's ``snapshot_id``) are read as
migrated (:func:`migrate_ids`): an older slot equal to a newer slot gets that slot's id (it is the same version
written again, as write pooling stored it); a distinct one gets :data:`UNKNOWN_SNAPSHOT` (an older version of an
unrecorded snapshot, pooled until it is shifted out). Values move nowhere, so the migration changes no served
value; the next ``snapshot`` write then keeps one version per snapshot, as above. :func:`v1_rows` finds them.

Arrays, not rows: every function works on ``N`` users at once (values ``[N, S, K, D]`` fp16 with NaN in empty
slots, ids ``[N, S]`` object with None in empty slots), so a writer's chunk and the study's whole population
pool through the same code.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd

from sum_models.shift import POOL_DEPTH

__all__ = [
    "POOL_DEPTH", "SLOTS", "SLOT_ID_FIELDS", "PACKED_FIELDS", "VALUE_PREFIX", "UNKNOWN_SNAPSHOT", "PoolUnit", "POOL_UNITS",
    "Slots", "served_fields", "batch_fields", "slot_fields", "history_fields",
    "pack_value", "unpack_value", "pool", "migrate_ids", "v1_rows", "one_version_per_snapshot", "shift_in",
    "served_after_promotion", "drop_snapshot", "snapshot_is_older", "as_slots",
]

#: The raw versions a row keeps, latest first: ``raw``, ``prev1`` .. ``prev{POOL_DEPTH - 1}``.
SLOTS: tuple[str, ...] = ("raw", *(f"prev{i}" for i in range(1, POOL_DEPTH)))
#: The snapshot id of each slot: slot 0's is the row's ``snapshot_id`` (the latest version's, as before).
SLOT_ID_FIELDS: tuple[str, ...] = ("snapshot_id", *(f"{s}_snapshot_id" for s in SLOTS[1:]))
#: The served and the batch value, each packed into one bytes field (what SOAP's reads fetch).
PACKED_FIELDS = {"served": "served_packed", "batch": "batch_packed"}
#: The prefix of a value's K fields (``{prefix}{k}``): the served value, the batch value and each slot's version.
VALUE_PREFIX = {"served": "embedding_", "batch": "batch_embedding_", **{s: f"{s}_embedding_" for s in SLOTS}}
#: The id of a migrated slot whose snapshot was not recorded (schema v1 rows).
UNKNOWN_SNAPSHOT = "?"

PoolUnit = Literal["snapshot", "write"]
POOL_UNITS: tuple[str, ...] = ("snapshot", "write")

_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")


# ------------------------------------------------------------------------------------------------ fields

def served_fields(k: int) -> list[str]:
    """The served value's fields: ``embedding_0 .. embedding_{K-1}`` and its identity."""
    return [f"{VALUE_PREFIX['served']}{j}" for j in range(k)] + ["snapshot_id", "written_at_ms", "pooled_versions"]


def batch_fields(k: int) -> list[str]:
    """The last daily batch value (what ``offline`` mode serves)."""
    return [f"{VALUE_PREFIX['batch']}{j}" for j in range(k)] + ["batch_snapshot_id", "batch_written_at_ms"]


def slot_fields(k: int) -> list[str]:
    """The raw versions and the snapshot id of each older slot (slot 0's id is ``snapshot_id``)."""
    return [f"{VALUE_PREFIX[s]}{j}" for s in SLOTS for j in range(k)] + list(SLOT_ID_FIELDS[1:])


def history_fields(k: int) -> list[str]:
    """Every unpacked field of a row (what a writer needs to pool and carry over)."""
    return served_fields(k) + slot_fields(k) + batch_fields(k)


# ------------------------------------------------------------------------------------------------ packing

#: ``served_packed`` / ``batch_packed``: format version, K, D, write time (Unix ms), versions pooled (-1: none),
#: snapshot id length (UTF-8 bytes); then the snapshot id, then the K x D values as little-endian fp16.
_PACKED_HEADER = struct.Struct("<BHHqhH")
_PACKED_VERSION = 1


def pack_value(embeddings: np.ndarray, snapshot_id: str, written_at_ms: int, pooled_versions: int | None) -> bytes:
    """One stored value (fp16 ``[K, D]`` and its identity) as the bytes of a ``*_packed`` field."""
    sid = str(snapshot_id).encode("utf-8")
    k, d = embeddings.shape
    header = _PACKED_HEADER.pack(_PACKED_VERSION, k, d, int(written_at_ms),
                                 -1 if pooled_versions is None else int(pooled_versions), len(sid))
    return header + sid + np.ascontiguousarray(embeddings, dtype="<f2").tobytes()


def unpack_value(packed: bytes | None) -> dict[str, Any] | None:
    """A ``*_packed`` field as ``{"snapshot_id", "written_at_ms", "pooled_versions", "embeddings": fp16 [K, D]}``
    (the embeddings a read-only view of ``packed``); None for an empty or malformed field."""
    if not packed or len(packed) < _PACKED_HEADER.size:
        return None
    version, k, d, ms, pooled, n_sid = _PACKED_HEADER.unpack_from(packed)
    start = _PACKED_HEADER.size + n_sid
    if version != _PACKED_VERSION or len(packed) != start + 2 * k * d or k * d == 0:
        return None
    return {
        "snapshot_id": packed[_PACKED_HEADER.size : start].decode("utf-8"),
        "written_at_ms": ms,
        "pooled_versions": None if pooled < 0 else pooled,
        "embeddings": np.frombuffer(packed, dtype="<f2", count=k * d, offset=start).reshape(k, d),
    }


# ------------------------------------------------------------------------------------------------ pooling

@dataclass
class Slots:
    """``N`` users' stored versions.

    Attributes:
        values: fp16 ``[N, S, K, D]``, latest first; NaN fills an empty slot.
        ids: object ``[N, S]``: the snapshot id of each slot, None for an empty one.
        written_ms: int64 ``[N]``: the write time of slot 0 (-1: empty row).
    """

    values: np.ndarray
    ids: np.ndarray
    written_ms: np.ndarray

    @classmethod
    def empty(cls, n: int, k: int, d: int, depth: int = POOL_DEPTH) -> "Slots":
        """``n`` rows with nothing stored (new users).

        Example::

            >>> Slots.empty(2, 1, 4).values.shape
            (2, 3, 1, 4)
        """
        return cls(np.full((n, depth, k, d), np.nan, np.float16), np.full((n, depth), None, dtype=object),
                   np.full(n, -1, np.int64))

    def copy(self) -> "Slots":
        return Slots(self.values.copy(), self.ids.copy(), self.written_ms.copy())

    def take(self, rows: np.ndarray) -> "Slots":
        return Slots(self.values[rows], self.ids[rows], self.written_ms[rows])

    def put(self, rows: np.ndarray, other: "Slots") -> None:
        self.values[rows], self.ids[rows], self.written_ms[rows] = other.values, other.ids, other.written_ms


def pool(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The served values of stored slots: ``(fp16 [N, K, D] mean of the non-empty slots computed in float64,
    int64 [N] versions pooled)``. A row with no version pools to NaN (nothing to serve).

    Bit-identical to :func:`sum_models.shift.average_pool` of the non-empty slots (a sum of float64 zeros
    added for the empty ones changes no bit).
    """
    present = ~np.isnan(values[:, :, 0, 0])                       # [N, S]
    n = present.sum(axis=1)
    total = np.where(present[:, :, None, None], values.astype(np.float64), 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n[:, None, None]
    return mean.astype(np.float16), n.astype(np.int64)


def snapshot_is_older(snapshot_id: str, than: Any) -> np.ndarray | bool:
    """Whether ``snapshot_id`` was trained on an earlier day than ``than`` (one id or an array of them), read from
    the ``YYYY-MM-DD`` in the ids (``sum-2026-01-03``); False when either carries no date."""
    mine = _DATE.search(str(snapshot_id))
    if mine is None:
        return np.zeros(np.shape(than), bool) if np.ndim(than) else False

    def older(other: Any) -> bool:
        theirs = _DATE.search(str(other)) if other is not None else None
        return theirs is not None and mine.group(1) < theirs.group(1)

    if np.ndim(than):
        # each distinct id parsed once (a writer's chunk or the study's population holds a few snapshots)
        codes, distinct = pd.factorize(np.asarray(than, dtype=object).ravel(), use_na_sentinel=True)
        verdicts = np.fromiter((older(o) for o in distinct), bool, count=len(distinct))
        return np.where(codes >= 0, verdicts[np.maximum(codes, 0)] if len(distinct) else False,
                        False).reshape(np.shape(than))
    return older(than)


def v1_rows(slots: Slots) -> np.ndarray:
    """bool ``[N]``: the rows in the schema v1 layout (an older slot holds a value but no snapshot id)."""
    legacy = ~np.isnan(slots.values[:, :, 0, 0]) & np.equal(slots.ids, None)
    return legacy[:, 1:].any(axis=1)  # slot 0's id (snapshot_id) was always written


def _same_value(values: np.ndarray, s: int, t: int) -> np.ndarray:
    """bool ``[N]``: slot ``s`` holds exactly slot ``t``'s value (empty slots: False)."""
    return (values[:, s] == values[:, t]).all(axis=(1, 2))


def migrate_ids(slots: Slots) -> Slots:
    """Rows of schema v1 (older slots without their snapshot ids) with every slot's id filled; other rows unchanged.

    An older slot whose value equals a newer slot's is the same version written again (write pooling stored it so)
    and gets the newest such slot's id; a distinct one gets :data:`UNKNOWN_SNAPSHOT`. No value moves: the pool,
    and so the served value, is unchanged. Idempotent.
    """
    rows = v1_rows(slots)
    if not rows.any():
        return slots
    out = slots.copy()
    has_value = ~np.isnan(out.values[:, :, 0, 0])
    for s in range(1, out.ids.shape[1]):
        legacy = rows & has_value[:, s] & np.equal(out.ids[:, s], None)
        label = np.full(len(legacy), UNKNOWN_SNAPSHOT, dtype=object)
        found = np.zeros(len(legacy), bool)
        for t in range(s):  # the newest equal slot names it
            hit = legacy & ~found & has_value[:, t] & _same_value(out.values, s, t)
            label[hit] = out.ids[hit, t]
            found |= hit
        out.ids[legacy, s] = label[legacy]
    return out


def one_version_per_snapshot(slots: Slots) -> Slots:
    """The rows with one slot per snapshot (what ``snapshot`` pooling keeps): an older slot repeating a newer one
    -- the same snapshot id, or for :data:`UNKNOWN_SNAPSHOT` the same value -- is emptied and the survivors move up,
    latest first. Rows written under ``write`` pooling (copies of a snapshot's versions) and migrated v1 rows get so
    at their first ``snapshot`` write. Rows without repeats are unchanged."""
    ids, values = slots.ids, slots.values
    depth = ids.shape[1]
    repeat = np.zeros(ids.shape, bool)
    for s in range(1, depth):
        for t in range(s):
            same = np.equal(ids[:, s], ids[:, t]) & ~np.equal(ids[:, s], None)
            same &= ~np.equal(ids[:, s], UNKNOWN_SNAPSHOT) | _same_value(values, s, t)
            repeat[:, s] |= same
    rows = np.flatnonzero(repeat.any(axis=1))
    if not len(rows):
        return slots
    out = slots.copy()
    for r in rows:
        keep = np.flatnonzero(~repeat[r] & ~np.equal(ids[r], None))
        out.values[r] = np.nan
        out.ids[r] = None
        out.values[r, : len(keep)] = values[r, keep]
        out.ids[r, : len(keep)] = ids[r, keep]
    return out


def shift_in(stored: Slots, new: np.ndarray, snapshot_id: str, written_ms: int | np.ndarray,
             unit: PoolUnit = "snapshot") -> tuple[Slots, np.ndarray]:
    """Writes one new version per user into stored slots (the module's pooling rule).

    Args:
        stored: The users' slots as stored (schema v1 rows are migrated first; under ``snapshot`` pooling repeats of
            a snapshot are then dropped, :func:`one_version_per_snapshot`).
        new: fp16 ``[N, K, D]``: the version each user's row receives.
        snapshot_id: The snapshot that computed ``new``.
        written_ms: Its write time, Unix ms: one for all rows or int64 ``[N]``.
        unit: ``snapshot`` (a version per snapshot) or ``write`` (a version per write).

    Returns:
        ``(slots, landed)``: the rows after the write and, per row, the slot the version landed in
        (0 after a shift or a replace of the current version, ``s > 0`` for a late write of an older snapshot
        into its own slot, -1 when it was dropped: that row is unchanged and need not be written).

    Example::

        >>> import numpy as np
        >>> rows = Slots.empty(1, 1, 2)
        >>> rows, _ = shift_in(rows, np.ones((1, 1, 2), np.float16), "sum-2026-01-01", 1)
        >>> rows, _ = shift_in(rows, np.full((1, 1, 2), 3, np.float16), "sum-2026-01-02", 2)
        >>> rows, landed = shift_in(rows, np.full((1, 1, 2), 5, np.float16), "sum-2026-01-02", 3)
        >>> pool(rows.values)[0][0, 0].tolist(), int(landed[0])   # mean of 5 (replaced 3) and 1
        ([3.0, 3.0], 0)
    """
    if unit not in POOL_UNITS:
        raise ValueError(f"pool unit must be one of {POOL_UNITS}, got {unit!r}")
    new = np.asarray(new, dtype=np.float16)
    n, depth = stored.ids.shape
    if new.shape != (n, *stored.values.shape[2:]):
        raise ValueError(f"{new.shape[0]} new versions of shape {new.shape[1:]} for {n} stored rows of shape "
                         f"{stored.values.shape[2:]}")
    ms = np.broadcast_to(np.asarray(written_ms, dtype=np.int64), (n,))
    cur = migrate_ids(stored)
    if unit == "snapshot":
        cur = one_version_per_snapshot(cur)
    out = cur.copy()
    sid = str(snapshot_id)
    match = np.equal(cur.ids, sid)                                   # [N, S]
    if unit == "snapshot":
        own = match.any(axis=1)
        slot = np.where(own, match.argmax(axis=1), 0)
        dropped = ~own & np.asarray(snapshot_is_older(sid, cur.ids[:, 0]), bool)
    else:  # a version per write; the same write again replaces it
        own = match[:, 0] & (cur.written_ms == ms)
        slot = np.zeros(n, np.int64)
        dropped = np.zeros(n, bool)
    shift = ~own & ~dropped
    if shift.any():
        out.values[shift, 1:] = cur.values[shift, :-1]
        out.ids[shift, 1:] = cur.ids[shift, :-1]
    write = ~dropped
    rows = np.flatnonzero(write)
    out.values[rows, slot[rows]] = new[rows]
    out.ids[rows, slot[rows]] = sid
    # slot 0's write time: the new one when the version landed there
    at0 = write & (slot == 0)
    out.written_ms[at0] = ms[at0]
    landed = np.where(dropped, -1, slot).astype(np.int64)
    return out, landed


def served_after_promotion(history: Slots, candidate: np.ndarray, candidate_id: str,
                           unit: PoolUnit = "snapshot") -> np.ndarray:
    """What serving hands downstream once a candidate is production: fp16 ``[N, K, D]``.

    Under ``snapshot`` pooling that is the candidate's first version shifted into each user's stored history
    (and it stays so while the candidate serves); under ``write`` pooling the history fills with the candidate's
    own writes after ``POOL_DEPTH`` requests, so the steady state every later request gets is served: the raw
    candidate (what most impressions see).
    """
    if unit == "write":
        out = history
        for i in range(history.ids.shape[1]):
            out, _ = shift_in(out, candidate, candidate_id, np.iinfo(np.int64).max - history.ids.shape[1] + i, "write")
    else:
        out, _ = shift_in(history, candidate, candidate_id, np.iinfo(np.int64).max, "snapshot")
    return pool(out.values)[0]


def drop_snapshot(stored: Slots, snapshot_id: str) -> tuple[Slots, np.ndarray]:
    """Stored slots without the versions of one snapshot (a rollback retires it): the survivors move up.

    Returns:
        ``(slots, changed)``: the rows and a bool ``[N]`` of those that held the snapshot (rows emptied
        entirely keep nothing to serve: their pool is NaN).
    """
    cur = migrate_ids(stored)
    hit = np.equal(cur.ids, str(snapshot_id))
    changed = hit.any(axis=1)
    out = cur.copy()
    for r in np.flatnonzero(changed):
        keep = np.flatnonzero(~hit[r] & ~np.equal(cur.ids[r], None))
        out.values[r] = np.nan
        out.ids[r] = None
        out.values[r, : len(keep)] = cur.values[r, keep]
        out.ids[r, : len(keep)] = cur.ids[r, keep]
        if hit[r, 0]:
            out.written_ms[r] = -1 if not len(keep) else cur.written_ms[r]
    return out, changed


def as_slots(rows: Sequence[dict[str, Any] | None], k: int, d: int) -> Slots:
    """Stored rows (``{field: value}`` as the online store gives them; None: no row) as :class:`Slots`. A slot
    whose value is missing or of another shape than ``[K, D]`` is empty."""
    out = Slots.empty(len(rows), k, d)
    for r, row in enumerate(rows):
        if not row:
            continue
        for s, name in enumerate(SLOTS):
            parts = [row.get(f"{VALUE_PREFIX[name]}{j}") for j in range(k)]
            if any(p is None or len(p) != d for p in parts):
                continue
            out.values[r, s] = np.asarray(parts, dtype=np.float32).astype(np.float16)
            out.ids[r, s] = row.get(SLOT_ID_FIELDS[s]) or None
        ms = row.get("written_at_ms")
        out.written_ms[r] = -1 if ms is None else int(ms)
    return out
