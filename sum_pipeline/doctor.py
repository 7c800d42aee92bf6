"""``sumctl doctor``: do the registry, the version tags, the DVC remote, the online store and serving agree?

Each check reads one pair of sources of truth and lists every disagreement as a :class:`Finding` with the
command that repairs it; nothing is changed. The checks:

* **registry vs GTO** - the registry's production is GTO's ``user-tower#prod``; every snapshot the registry
  ever promoted has a ``user-tower@vX.Y.Z`` version tag and every tag is a promotion the registry knows;
* **DVC remote** - every promoted snapshot and every versioned partition (``*.dvc`` in the workspace) is in
  the remote or at least in the local cache (``dvc status --cloud``: ``new`` = not pushed yet, ``missing`` =
  lost), and every promoted snapshot folder present here holds the files its manifest's sha256 name;
* **online store** - every user the last daily batch wrote has a row (a flushed store reads as unknown users);
  every ``sum_embeddings`` row's latest version and batch value come from promoted
  snapshots, ``pooled_versions`` counts the stored raw versions, the served value is their pool by the row's
  owner (``sum_platform.embedding_row``, paper §5.2), the packed copies (``served_packed``, ``batch_packed``)
  equal the separate fields, and no row is left in the v1 layout (older versions without snapshot ids);
* **serving** - the running app serves the registry's production snapshot, and frozen mode the first one
  ever promoted (skipped with ``serving=False``; an app that does not answer is a finding). Compared only when the
  app is this workspace's (``/version``'s ``workspace_id`` is the workspace's identity): another workspace's app on
  the port, or one without an identity, is named as such and not compared.

Each repair is the smallest that fixes its finding (lost rows: only those rows are written again; an unreadable
store: a rebuild beside the old one), a store that is only busy (``database is locked``) is read again and, if it
stays busy, named as such, not as damage. Repairs are shell lines with every path quoted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.rollout import base_url, served_version
from serving.store_io import (PACKED_FIELDS, _stack, history_fields, reader_for, retired_snapshots, row_slots,
                              unpack_value)
from sum_platform.context import Context
from sum_platform.embedding_row import SLOT_ID_FIELDS, UNKNOWN_SNAPSHOT, VALUE_PREFIX, pool, v1_rows
from sum_platform.feature_store import get_store
from sum_platform.partitions import read_partition
from sum_platform.versioning import (ARTIFACT_NAME, VersioningError, _dvc, list_promotions,
                                     production_snapshot)

__all__ = ["Finding", "Diagnosis", "diagnose", "serving_owner"]

log = logging.getLogger(__name__)

#: Users whose rows are checked per online-store read.
CHUNK = 512
#: Example user ids a finding names.
EXAMPLES = 5
#: Reads of a busy online store (``database is locked``) before it is named as busy, and the pause between them.
BUSY_ATTEMPTS, BUSY_PAUSE_S = 4, 0.5


@dataclass
class Finding:
    """One disagreement: where, what, and the command that repairs it."""

    component: str
    problem: str
    repair: str


@dataclass
class Diagnosis:
    """What :func:`diagnose` checked (``checked``: counts per component) and found."""

    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "checked": self.checked, "findings": [asdict(f) for f in self.findings]}


def diagnose(ctx: Context, *, serving: bool = True) -> Diagnosis:
    """Runs every check (see the module docstring) on the workspace of ``ctx``."""
    out = Diagnosis()
    promoted = _registry_and_tags(ctx, out)
    _remote(ctx, out, promoted)
    _online_store(ctx, out, promoted)
    if serving:
        _serving(ctx, out, promoted)
    return out


def _in_ws(ctx: Context, command: str) -> str:
    return f"cd {shlex.quote(str(ctx.ws.root))} && {command}"


def _exe(name: str) -> str:
    """The platform's own ``sumctl`` / ``dvc`` / ``gto`` (the venv's), so a repair runs as printed (quoted for a
    shell: a venv path may hold spaces)."""
    candidate = Path(sys.executable).parent / name
    return shlex.quote(str(candidate) if candidate.exists() else name)


SUMCTL = _exe("sumctl")


# ---------------------------------------------------------------------------------------------
# registry vs GTO
# ---------------------------------------------------------------------------------------------
def _registry_and_tags(ctx: Context, out: Diagnosis) -> list[str]:
    """Checks the registry against GTO's tags; returns the registry's promoted snapshot ids, oldest first."""
    history = ctx.registry.promoted_history()
    promoted = [r.snapshot_id for r in sorted(history, key=lambda r: (r.promoted_at or "", r.snapshot_id))]
    prod = ctx.registry.production()
    try:
        tags = {p.snapshot_id: p.tag for p in list_promotions(ctx.ws.root)}
        gto_prod = production_snapshot(ctx.ws.root)
    except (VersioningError, OSError) as exc:
        out.findings.append(Finding("versioning", f"the workspace's version tags cannot be read: {exc}",
                                    f"{SUMCTL} run (initialises the workspace repository) or restore its .git"))
        out.checked["registry"] = {"promoted": len(promoted)}
        return promoted
    out.checked["registry"] = {"promoted": len(promoted), "version_tags": len(tags),
                               "production": prod.snapshot_id if prod else None, "gto_production": gto_prod}
    if prod is not None and gto_prod != prod.snapshot_id:
        out.findings.append(Finding(
            "versioning", f"registry production is {prod.snapshot_id}, GTO's {ARTIFACT_NAME}#prod is {gto_prod}",
            f"{SUMCTL} promote {prod.snapshot_id} --reason 're-assign prod to the registry production'"))
    if prod is None and gto_prod is not None:
        out.findings.append(Finding(
            "registry", f"no production in the registry, GTO's {ARTIFACT_NAME}#prod is {gto_prod}",
            f"{SUMCTL} promote {gto_prod} --force --reason 'registry lost its production'"))
    for sid in promoted:
        if sid not in tags:
            out.findings.append(Finding(
                "versioning", f"{sid} was promoted (registry) but has no {ARTIFACT_NAME} version tag",
                f"{SUMCTL} promote {sid} --force --reason 'tag a past promotion'"
                + (f" && {SUMCTL} promote {prod.snapshot_id} --force --reason 'back to production'" if prod else "")))
    for sid, tag in sorted(tags.items()):
        if sid not in promoted:
            out.findings.append(Finding(
                "versioning", f"{tag} records {sid}, which the registry never promoted",
                _in_ws(ctx, f"{_exe('gto')} deregister {ARTIFACT_NAME} {tag.split('@', 1)[1]}")))
    return promoted


# ---------------------------------------------------------------------------------------------
# DVC remote and manifests
# ---------------------------------------------------------------------------------------------
def _remote(ctx: Context, out: Diagnosis, promoted: list[str]) -> None:
    root = ctx.ws.root
    targets = sorted(str(p.relative_to(root)) for p in root.glob("data/*/ds=*.dvc"))
    missing_dvc = [sid for sid in promoted if not (root / "snapshots" / f"{sid}.dvc").exists()]
    targets += [f"snapshots/{sid}.dvc" for sid in promoted if sid not in missing_dvc]
    for sid in missing_dvc:
        out.findings.append(Finding("remote", f"promoted snapshot {sid} is not tracked (no snapshots/{sid}.dvc)",
                                    f"{SUMCTL} promote {sid} --reason 'track the snapshot'"))
    status: dict[str, str] = {}
    if targets:
        try:
            status = json.loads(_dvc(root, "status", "--cloud", "--json", *targets).stdout or "{}")
        except (VersioningError, ValueError) as exc:
            out.findings.append(Finding("remote", f"`dvc status --cloud` failed: {exc}",
                                        _in_ws(ctx, f"{_exe('dvc')} remote list   # then fix the remote's URL or reachability")))
    out.checked["remote"] = {"tracked": len(targets), "not_in_remote": len(status)}
    by_state: dict[str, list[str]] = {}
    for name, state in status.items():
        by_state.setdefault(str(state), []).append(name)
    if by_state.get("new"):
        names = sorted(by_state["new"])
        out.findings.append(Finding("remote", f"{len(names)} tracked file(s) are in the local cache only, not in "
                                    f"the remote: e.g. {names[:EXAMPLES]}", _in_ws(ctx, f"{_exe('dvc')} push")))
    if by_state.get("missing"):
        names = sorted(by_state["missing"])
        out.findings.append(Finding("remote", f"{len(names)} tracked file(s) are in neither the cache nor the remote "
                                    f"(not restorable): e.g. {names[:EXAMPLES]}",
                                    _in_ws(ctx, f"{_exe('dvc')} add <the path> && {_exe('dvc')} push   # if the files still exist here")))
    checked = 0
    for sid in promoted:
        folder = ctx.ws.snapshot_dir(sid)
        manifest = folder / "manifest.json"
        if not manifest.exists():
            continue  # not materialised here: the remote check above covers it
        checked += 1
        expected = json.loads(manifest.read_text()).get("sha256") or {}
        bad = [name for name, digest in sorted(expected.items())
               if not (folder / name).exists() or _sha256(folder / name) != digest]
        if bad:
            out.findings.append(Finding(
                "remote", f"snapshot {sid}: {bad} differ from the sha256 in its manifest",
                _in_ws(ctx, f"{_exe('dvc')} checkout --force snapshots/{sid}.dvc   # the promoted files, from the cache or "
                            "after `dvc pull`")))
    out.checked["manifests"] = checked


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# online store
# ---------------------------------------------------------------------------------------------
def _busy(exc: BaseException) -> bool:
    """A store that is only busy (SQLite: another writer's transaction), not damaged."""
    return isinstance(exc, sqlite3.OperationalError) and any(w in str(exc).lower() for w in ("locked", "busy"))


def _unreachable(exc: BaseException) -> bool:
    """A Redis server that does not answer (down or not started): not a reason to rebuild anything."""
    import redis

    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


def _read_users(ctx: Context) -> tuple[Any, list[int]]:
    """The reader and the users with a row; a busy store is read again (:data:`BUSY_ATTEMPTS`)."""
    for attempt in range(BUSY_ATTEMPTS):
        try:
            reader = reader_for(get_store(ctx.params))
            return reader, reader.user_ids()
        except Exception as exc:
            if not _busy(exc) or attempt == BUSY_ATTEMPTS - 1:
                raise
            log.info("online store busy (%s): reading again", exc)
            time.sleep(BUSY_PAUSE_S)
    raise AssertionError("unreachable")


def _online_store(ctx: Context, out: Diagnosis, promoted: list[str]) -> None:
    try:
        reader, users = _read_users(ctx)
    except Exception as exc:  # an unreadable store is itself the finding
        what = f"{type(exc).__name__}: {exc}"
        if _busy(exc):
            out.findings.append(Finding(
                "online_store", f"the online store stayed busy over {BUSY_ATTEMPTS} reads ({what}): another process "
                "holds a write transaction; this is not damage, and its rows were not checked",
                f"{SUMCTL} doctor   # again once the writer is done (nothing to repair)"))
        elif _unreachable(exc):
            out.findings.append(Finding("online_store", f"the online store's Redis does not answer ({what})",
                                        f"{SUMCTL} up   # starts the stack's Redis (its data is on disk)"))
        else:
            out.findings.append(Finding("online_store", f"the online store cannot be read: {what}",
                                        f"{SUMCTL} rebuild-online   # builds it anew from the offline store beside the "
                                        "old one, then swaps"))
        return
    known = set(promoted)
    problems: dict[str, list[int]] = {}
    v1: list[int] = []
    rows_checked = 0
    with_rows: set[int] = set()
    k = reader.k
    fields = [*history_fields(k), *PACKED_FIELDS.values()]
    for lo in range(0, len(users), CHUNK):
        for uid, row in reader.rows(users[lo : lo + CHUNK], fields).items():
            if row.get("snapshot_id") is None and row.get("batch_snapshot_id") is None:
                continue  # a user with features only (Redis: the hash holds other views)
            rows_checked += 1
            with_rows.add(int(uid))
            for problem in _row_problems(row, k, known):
                problems.setdefault(problem, []).append(uid)
            if v1_rows(row_slots(row, k))[0]:
                v1.append(uid)
    out.checked["online_store"] = {"rows": rows_checked, "v1_layout": len(v1),
                                   # retired by rollbacks (their late writes are dropped) and not promoted since
                                   "retired_snapshots": sorted(retired_snapshots(reader.store))}
    if v1:
        out.findings.append(Finding(
            "online_store", f"{len(v1)} row(s) in the v1 layout (older versions without their snapshot ids: pooled "
            f"as versions of an unrecorded snapshot until their next write); users e.g. {v1[:EXAMPLES]}",
            f"{SUMCTL} migrate-embeddings   # fills the ids in place; no served value changes"))
    _lost_rows(ctx, out, with_rows)
    latest = max((r.ds for r in ctx.registry.promoted_history()), default=None)
    repair = f"{SUMCTL} stage materialize_embeddings --ds {latest or '<the latest date>'}   # rewrites every user's row"
    for problem, uids in sorted(problems.items()):
        # A never-promoted snapshot's versions leave the pools only by retiring them: a write of production lands
        # in production's own slot (sum_platform.embedding_row), it does not push another snapshot out.
        rogue = re.fullmatch(r"(?:latest|an older) version by (.+), never promoted", problem)
        fix = (f"{SUMCTL} migrate-embeddings --retire {shlex.quote(rogue.group(1))}   # takes its versions out of "
               "every row" if rogue else repair)
        out.findings.append(Finding("online_store", f"{len(uids)} row(s): {problem}; users e.g. {uids[:EXAMPLES]}",
                                    fix))


def _lost_rows(ctx: Context, out: Diagnosis, with_rows: set[int]) -> None:
    """The users the last daily batch wrote (its day's users partition, less the users it skipped) all have a
    row: a store that lost rows (a flushed Redis, a file replaced by an empty one) reads as unknown users."""
    records = sorted(ctx.ws.root.glob("runs/*/materialize.json"))
    if not records:
        return
    batch = json.loads(records[-1].read_text())
    folder = ctx.ws.users_dir(batch["ds"])
    if not folder.exists():
        return  # quarantined since, or removed: nothing to compare with
    users = set(read_partition(folder, columns=["user_id"])["user_id"].astype(int).tolist())
    skipped = sum(int(what.get("count", 0)) for what in (batch.get("skipped") or {}).values())
    missing = sorted(users - with_rows)
    out.checked["online_store"]["batch"] = {"ds": batch["ds"], "users": len(users)}
    if len(missing) > skipped:
        out.findings.append(Finding(
            "online_store", f"{len(missing)} of the {len(users)} users the daily batch of {batch['ds']} wrote have no "
            f"embeddings row ({skipped} were skipped); users e.g. {missing[:EXAMPLES]}",
            f"{SUMCTL} rebuild-online --only-missing   # writes those users' rows from the offline store, no other"))


def _row_problems(row: dict, k: int, promoted: set[str]) -> list[str]:
    """What is wrong with one stored ``sum_embeddings`` row (empty: nothing)."""
    problems = []
    sid, bsid = row.get("snapshot_id"), row.get("batch_snapshot_id")
    if sid is not None and sid not in promoted:
        problems.append(f"latest version by {sid}, never promoted")
    for older in dict.fromkeys(row.get(f) for f in SLOT_ID_FIELDS[1:]):
        if older is not None and older != UNKNOWN_SNAPSHOT and older not in promoted and older != sid:
            problems.append(f"an older version by {older}, never promoted")
    if bsid is not None and bsid not in promoted:
        problems.append(f"batch value by {bsid}, never promoted")
    served = _stack([row.get(f"embedding_{j}") for j in range(k)])
    slots = row_slots(row, k)  # the row owner's reading of the slots and its pool (sum_platform.embedding_row)
    pooled, n = pool(slots.values)
    if served is not None:
        if row.get("pooled_versions") != int(n[0]):
            problems.append("pooled_versions differs from the raw versions stored")
        elif n[0] and not np.array_equal(pooled[0].astype(np.float32), served):
            problems.append("served value is not the fp16 mean of the raw versions")
    for source, name in PACKED_FIELDS.items():
        packed = row.get(name)
        if packed is None:
            continue  # a row written before the packed fields: read from the separate ones
        value = unpack_value(packed)
        prefix = VALUE_PREFIX[source]
        sid_f, ms_f = (("snapshot_id", "written_at_ms") if source == "served" else
                       ("batch_snapshot_id", "batch_written_at_ms"))
        separate = _stack([row.get(f"{prefix}{j}") for j in range(k)])
        if value is None and separate is None:
            continue
        if (value is None or separate is None or not np.array_equal(value["embeddings"].astype(np.float32), separate)
                or value["snapshot_id"] != row.get(sid_f) or value["written_at_ms"] != row.get(ms_f)):
            problems.append(f"{name} differs from the separate {source} fields")
    return problems


# ---------------------------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------------------------
def serving_owner(body: dict[str, Any], identity: str | None) -> str | None:
    """None when the app whose ``/version`` answered ``body`` is this workspace's (its ``workspace_id`` is the
    workspace's ``identity``); otherwise whose it is, said so that its snapshots are not taken for this workspace's."""
    theirs = body.get("workspace_id")
    if identity is None:
        return ("this workspace has no identity (no marker file), so the app that answers cannot be told to be its own"
                + (f"; the app belongs to workspace {theirs}" if theirs else ""))
    if not theirs:
        return "the app reports no workspace identity (an app without one, or rolled out before identities)"
    if theirs != identity:
        return f"the app belongs to another workspace ({theirs}), not this one ({identity})"
    return None


def _serving(ctx: Context, out: Diagnosis, promoted: list[str]) -> None:
    prod = ctx.registry.production()
    if prod is None:
        return
    body = served_version(ctx.params, timeout_s=10.0)
    url = base_url(ctx.params)
    if body is None:
        out.findings.append(Finding("serving", f"the SOAP app does not answer GET {url}/version",
                                    f"{SUMCTL} up   # or {SUMCTL} serve"))
        return
    identity = ctx.ws.identity()
    other = serving_owner(body, identity)
    if other is not None:
        out.checked["serving"] = {"workspace_id": body.get("workspace_id"), "compared": False}
        out.findings.append(Finding(
            "serving", f"serving on {url}: {other}; what it serves was not compared with this workspace's registry",
            f"{SUMCTL} status   # stop that app from its own workspace (sumctl down there), then {SUMCTL} up here"
            if body.get("workspace_id") else f"{SUMCTL} serve   # if the app is this workspace's: rolls production out "
                                             "with the workspace's identity"))
        return
    first = min(ctx.registry.promoted_history(), key=lambda r: (r.ds, r.snapshot_id))
    out.checked["serving"] = {"snapshot_id": body.get("snapshot_id"), "frozen_snapshot_id": body.get("frozen_snapshot_id"),
                              "workspace_id": identity, "compared": True}
    if body.get("snapshot_id") != prod.snapshot_id:
        out.findings.append(Finding("serving", f"serving runs {body.get('snapshot_id')}, registry production is "
                                    f"{prod.snapshot_id}" + (f" ({body['last_error']})" if body.get("last_error") else ""),
                                    f"{SUMCTL} serve   # rolls the production snapshot out"))
    if body.get("frozen_snapshot_id") != first.snapshot_id:
        out.findings.append(Finding("serving", f"frozen mode runs {body.get('frozen_snapshot_id')}, the first "
                                    f"promoted snapshot is {first.snapshot_id}", f"{SUMCTL} serve"))
