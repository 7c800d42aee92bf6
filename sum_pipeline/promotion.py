"""Promotion and rollback: what the daily run's ``promote`` and an operator's ``sumctl promote`` /
``sumctl rollback`` do, and which snapshots a candidate is judged against.

Each promotion and rollback ends by versioning the audit trail (:mod:`sum_platform.audit_trail`: the registry,
the day records, the quarantine) and pushing the workspace's git history to its backup, under the promotion
lock, so the remote always holds who promoted what and why.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from serving.ray_cluster import ensure_ray
from serving.rollout import rollout as serve_rollout
from serving.rollout import served_snapshot_id
from serving.store_io import reinstate_snapshot, retire_snapshot
from sum_platform.audit_trail import save_audit_trail
from sum_platform.context import Context, context
from sum_platform.feature_store import get_store
from sum_platform.files import exclusive_lock
from sum_platform.versioning import VersioningError, data_version, tag_promotion, track_paths


def parent_for(snapshot_id: str, ctx: Context) -> str | None:
    """The snapshot a candidate warm-starts from; stable across reruns of the same date."""
    existing = ctx.registry.get(snapshot_id)
    if existing is not None:
        return existing.parent_id
    prod = ctx.registry.production()
    return prod.snapshot_id if prod else None


def baseline_history(snapshot_id: str, ctx: Context) -> list[str]:
    """Snapshots a candidate is judged against, newest first: production, then the ones before it.

    On a rerun of a date whose snapshot was already promoted, the history starts at the snapshot it
    replaced (its parent), so the rerun is judged exactly as the first run was.
    """
    history = [r.snapshot_id for r in ctx.registry.promoted_history() if r.snapshot_id != snapshot_id]
    own = ctx.registry.get(snapshot_id)
    if own is not None and own.stage in ("production", "retired"):
        history = history[history.index(own.parent_id):] if own.parent_id in history else []
    return history


def frozen_snapshot(ctx: Context) -> tuple[Path, str] | None:
    """``(folder, id)`` of the first snapshot ever promoted: frozen mode's tower (paper 6.4, "frozen user
    model"), which every deployment of the app is given; None before the first promotion or if its
    folder is gone."""
    first = min(ctx.registry.promoted_history(), key=lambda r: (r.ds, r.snapshot_id), default=None)
    if first is None or not ctx.ws.snapshot_dir(first.snapshot_id).exists():
        return None
    return ctx.ws.snapshot_dir(first.snapshot_id), first.snapshot_id


@contextlib.contextmanager
def promotion_lock(ctx: Context) -> Iterator[None]:
    """One promotion at a time in a workspace, across processes (a manual ``sumctl promote`` racing the daily
    run's): each moves GTO's ``prod`` and then the registry, so two interleaved could leave them naming different
    snapshots."""
    with exclusive_lock(ctx.ws.registry_db.parent / "promotion.lock"):
        yield


def promote_snapshot(ctx: Context, snapshot_id: str, actor: str, reason: str, force: bool = False) -> dict[str, Any]:
    """Promotion proper: files pushed and tagged first, then the registry flips in one transaction (one promotion
    of the workspace at a time: :func:`promotion_lock`)."""
    with promotion_lock(ctx):
        return _promote(ctx, snapshot_id, actor, reason, force)


def _promote(ctx: Context, snapshot_id: str, actor: str, reason: str, force: bool) -> dict[str, Any]:
    record = ctx.registry.get(snapshot_id)
    if record is None:
        raise LookupError(f"unknown snapshot {snapshot_id!r}")
    blessed = bool((record.record.get("verdict") or {}).get("blessed"))
    if not force and record.stage != "production" and not (record.stage == "candidate" and blessed):
        state = record.stage if record.stage != "candidate" else "a candidate the gate has not blessed"
        raise RuntimeError(f"snapshot {snapshot_id} is {state}; use --force with a reason to override")
    snap_dir = ctx.ws.snapshot_dir(snapshot_id)
    track_paths(ctx.ws.root, [snap_dir], f"snapshot: {snapshot_id}")
    tag = tag_promotion(ctx.ws.root, snapshot_id, f"promote {snapshot_id}: {reason}", tracked=True)
    ctx.registry.update_record(snapshot_id, {"snapshot_version": data_version(ctx.ws.root, snap_dir), "tag": tag})
    promoted = ctx.registry.promote(snapshot_id, actor=actor, reason=reason, force=force)
    # Promoting a snapshot a rollback retired undoes the rollback: its writes land again. After the registry flip
    # (the decision); a failure here is mended by promoting again (a no-op up to here for the production snapshot).
    try:
        reinstate_snapshot(get_store(ctx.params), snapshot_id)
    except Exception as exc:
        raise RuntimeError(f"{snapshot_id} promoted, but its retirement by an earlier rollback was not cleared (its "
                           f"writes are still dropped; rerun the promotion): {exc}") from exc
    _save_trail(ctx, f"audit: {snapshot_id} promoted by {actor}")
    return {"snapshot_id": snapshot_id, "tag": tag, "stage": promoted.stage, "promoted_at": promoted.promoted_at}


def _save_trail(ctx: Context, message: str) -> None:
    """Versions and pushes the audit trail; a failure says the promotion itself is done and a rerun completes it
    (promoting the production snapshot again is a no-op up to this step)."""
    try:
        save_audit_trail(ctx.ws, message)
    except VersioningError as exc:
        raise VersioningError(f"{message.removeprefix('audit: ')}, but its audit trail was not pushed (rerun the "
                              f"promotion to push it): {exc}") from exc


def rollback_production(actor: str, reason: str, to: str | None = None, reroll: bool = True) -> dict[str, Any]:
    """Makes the previous production snapshot (or ``to``) current again, re-rolls serving and retires the rolled-back
    snapshot's versions from every embedding row (:func:`serving.store_io.retire_snapshot`): no served pool holds
    it afterwards, a late write of it by a replica still running it is dropped, and the restored snapshot's next
    writes land in its own slot. Promoting the rolled-back snapshot again undoes this.

    Args:
        actor: Who rolls back (recorded).
        reason: Why (recorded).
        to: A snapshot that was production before; defaults to the one promoted before the current.
        reroll: Move a running serving app to it (skipped with a note when no serving app answers).

    Returns:
        What changed: from, to, the GTO tag, the serving outcome and the rows the retirement rewrote.
    """
    ctx = context()
    history = ctx.registry.promoted_history()
    if not history or history[0].stage != "production":
        raise RuntimeError("nothing is in production: nothing to roll back")
    current = history[0].snapshot_id
    candidates = [r.snapshot_id for r in history[1:] if r.snapshot_id != current]
    target = to or (candidates[0] if candidates else None)
    if target is None:
        raise RuntimeError(f"{current} is the only snapshot ever promoted: nothing to roll back to")
    if target not in candidates:
        raise RuntimeError(f"{target} was never production before {current}; rollback targets: {candidates}")
    promoted = promote_snapshot(ctx, target, actor=actor, reason=f"rollback from {current}: {reason}", force=True)
    out: dict[str, Any] = {"from": current, "to": target, "tag": promoted["tag"], "serving": "not running"}
    if reroll and served_snapshot_id(ctx.params, timeout_s=3) is not None:
        ensure_ray(ctx.params)
        out["serving"] = serve_rollout(ctx.params, ctx.ws.snapshot_dir(target), target,
                                       previous=(ctx.ws.snapshot_dir(current), current), frozen=frozen_snapshot(ctx))
    # After serving moved (the rolled-back snapshot's replicas no longer write): its versions leave every row.
    out["retired_rows"] = retire_snapshot(get_store(ctx.params), current)["retired"]
    with promotion_lock(ctx):
        ctx.registry.update_record(target, {"rollback": out | {"actor": actor, "reason": reason}})
        _save_trail(ctx, f"audit: rollback from {current} to {target} by {actor}")
    return out
