"""The daily SUM loop as plain functions: one per DAG task, each idempotent for its date ``ds``.

The Airflow DAG (``dags/sum_daily.py``), ``sumctl`` and ``dvc repro`` call these; none of them needs
Airflow. Every function reads the params in force (``SUM_PARAMS``) and the workspace (``SUM_WORKSPACE``),
writes through temporary paths that are moved into place, and returns a small JSON-able summary (which
Airflow stores as the task's XCom).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sum_platform.config import Params, load_params
from sum_platform.workspace import Workspace, ds_str, snapshot_id_for

log = logging.getLogger(__name__)

#: Fault injections for gate drills and the soak (DAG param ``candidate_fault``); never set in normal runs.
#: reinit: export re-initialised weights; perturb: add noise as large as each weight tensor's spread;
#: explode_lr: train with a learning rate 1000x the configured one; nan: poison one weight with NaN.
CANDIDATE_FAULTS = ("reinit", "perturb", "explode_lr", "nan")


@dataclass(frozen=True)
class Context:
    params: Params
    ws: Workspace

    @property
    def registry(self):
        from validation.registry import Registry

        return Registry(self.ws.registry_db)


def context() -> Context:
    params = load_params()
    return Context(params, Workspace(params.workspace))


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Writes JSON atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# ingest -> validate -> version data
# ---------------------------------------------------------------------------------------------
def ingest(ds: str) -> dict[str, Any]:
    """Makes the day's partitions available: the simulator writes the ones that are missing.

    An existing partition (delivered by an upstream, dropped in place by an operator, or deliberately
    corrupted by a test) is left alone, so validation judges exactly what arrived.

    After a quarantine (see :func:`validate_data`) the day's partition folders are absent, and a rerun of
    the date ingests the *fixed* partition:

    * simulator-sourced days are regenerated. The simulator is a pure function of ``(seed, ds)``, so this
      is the day's good data again: regeneration is the fix of a partition corrupted after it was produced.
    * for an upstream-sourced day, the operator drops the fixed partition(s) in place first
      (``data/events/ds=<ds>/`` and ``data/users/ds=<ds>/``); they are used as they are, and only a partition
      still missing is simulated (an existing one is never overwritten).

    Returns:
        ``written`` (True when anything was simulated), ``simulated`` (which partitions), and, when the date
        was quarantined before, ``quarantined_before`` (how often) and ``latest_quarantine``.
    """
    from sum_platform.feature_store import user_feature_fields
    from sum_platform.simulate import fields_from_feast, simulate_day, write_day, write_frame
    from sum_platform.versioning import init_workspace_repo
    from validation.quarantine import quarantined

    ctx = context()
    init_workspace_repo(ctx.ws.root, ctx.params.dvc_remote)
    folders = {"events": ctx.ws.events_dir(ds), "users": ctx.ws.users_dir(ds)}
    present = {kind: folder.is_dir() and any(folder.glob("*.parquet")) for kind, folder in folders.items()}
    history = quarantined(ctx.ws, ds)
    extra: dict[str, Any] = {}
    if history:
        extra = {"quarantined_before": len(history), "latest_quarantine": history[-1]["folder"]}
        log.warning("ds=%s was quarantined %d time(s) before (latest: %s); partitions in place: %s",
                    ds, len(history), history[-1]["folder"], sorted(k for k, v in present.items() if v) or "none")
    missing = [kind for kind, ok in present.items() if not ok]
    if not missing:
        return {"ds": ds, "written": False, "simulated": [], **extra}
    fields = fields_from_feast(user_feature_fields(ctx.params))
    if len(missing) == len(folders):
        return write_day(ds, ctx.params, ctx.ws, fields) | {"simulated": missing, **extra}
    frames = dict(zip(("events", "users"), simulate_day(ds, ctx.params, fields)))
    for kind in missing:  # an operator's partition in place is kept; only the missing one is simulated
        write_frame(frames[kind], folders[kind])
    log.info("ds=%s: simulated the missing %s partition(s), kept %s in place", ds, missing,
             sorted(set(folders) - set(missing)))
    return {"ds": ds, "written": True, "simulated": missing, **{k: len(frames[k]) for k in missing}, **extra}


def validate_data(ds: str) -> dict[str, Any]:
    """Runs the GX checkpoints of the day's partitions; on a failure quarantines them and raises.

    Data Docs are built on every run; their location is printed to the task log and returned. A failure
    (``DataValidationError``, naming every failed check) first moves the day's events and users partitions
    to ``<ws>/quarantine/ds=<ds>/<stamp>/`` with a ``reason.json`` (``validation.quarantine``; never
    deleted), records the failure and the quarantine folder in ``runs/<ds>/validation.json``, then
    re-raises: the run stops at validation, so training, promotion, the online store and serving never see
    the day. Rerunning the date afterwards validates the fixed partition (see :func:`ingest`: simulator days
    are regenerated, an operator may drop a fixed partition in place) against the same trailing days, since
    a failed day never becomes a baseline.
    """
    from sum_platform.feature_store import apply_definitions, feature_spec
    from validation.data_checks import DataValidationError, validate_day
    from validation.quarantine import quarantine_partition, reason_from_error

    ctx = context()
    spec = feature_spec(ctx.params, apply_definitions(ctx.params))
    try:
        reports = validate_day(ds, ctx.ws.root, spec, ctx.params)
    except DataValidationError as err:
        folder = quarantine_partition(ctx.ws, ds, reason_from_error(err))
        err.set_quarantine(folder)
        docs = next((r.data_docs_index for r in err.reports if r.data_docs_index), None)
        write_json(ctx.ws.run_dir(ds) / "validation.json", {
            "ds": ds, "success": False, "error": str(err), "failed_checks": err.failed_checks,
            "quarantine": str(folder), "data_docs": docs, "reports": [r.to_dict() for r in err.reports]})
        print(f"Data Docs: {docs}\nds={ds} QUARANTINED to {folder}", flush=True)
        raise
    docs = next((r.data_docs_index for r in reports if r.data_docs_index), None)
    summary = {"ds": ds, "success": True, "data_docs": docs, "reports": [r.to_dict() for r in reports]}
    write_json(ctx.ws.run_dir(ds) / "validation.json", summary)
    lines = [f"Data Docs: {docs}"] + [r.summary() for r in reports]
    print("\n".join(lines), flush=True)
    return {
        "ds": ds, "success": True, "evaluated": sum(r.evaluated for r in reports), "data_docs": docs,
        "warnings": {r.kind: r.warnings for r in reports if r.warnings},
        "skipped": {r.kind: r.skipped for r in reports if r.skipped},
        "baseline": next((r.baseline for r in reports if r.baseline), {}),
    }


def version_data(ds: str) -> dict[str, Any]:
    """Tracks the validated partitions with DVC, pushes them, commits the ``.dvc`` files."""
    from sum_platform.versioning import data_version, track_paths

    ctx = context()
    paths = [ctx.ws.events_dir(ds), ctx.ws.users_dir(ds)]
    commit = track_paths(ctx.ws.root, paths, f"data: partitions of {ds}")
    versions = {p.relative_to(ctx.ws.root).as_posix(): data_version(ctx.ws.root, p) for p in paths}
    write_json(ctx.ws.run_dir(ds) / "data_version.json", {"ds": ds, "commit": commit, "versions": versions})
    return {"ds": ds, "versions": versions}


def materialize_user_features(ds: str) -> dict[str, Any]:
    """Loads the day's user features into the online store (Feast materialize over the day)."""
    from sum_platform.feature_store import USER_FEATURES_VIEW, apply_definitions

    ctx = context()
    store = apply_definitions(ctx.params)
    start = datetime.fromisoformat(ds).replace(tzinfo=timezone.utc)
    store.materialize(start_date=start - timedelta(seconds=1), end_date=start + timedelta(days=1),
                      feature_views=[USER_FEATURES_VIEW])
    return {"ds": ds, "view": USER_FEATURES_VIEW}


# ---------------------------------------------------------------------------------------------
# train -> evaluate -> gate
# ---------------------------------------------------------------------------------------------
def training_frame(ds: str, ctx: Context):
    """The day's impressions joined point-in-time with the user features, through Feast.

    Returns:
        ``(train_df, holdout_df, spec)``; the holdout is a fixed hash-based share of impressions.
    """
    import numpy as np
    import pandas as pd

    from sum_models.data import fill_missing_user_features
    from sum_platform.feature_store import USER_FEATURES_VIEW, apply_definitions, feature_spec

    store = apply_definitions(ctx.params)
    spec = feature_spec(ctx.params, store)
    # The join is the slow part (~8 s a day); train and evaluate share it through a cache keyed by
    # the data version and the feature spec, so a fixed partition or a new feature never reads stale rows.
    versions = read_json(ctx.ws.run_dir(ds) / "data_version.json")["versions"] if (
        ctx.ws.run_dir(ds) / "data_version.json").exists() else {}
    key = hashlib.sha256(json.dumps([versions, spec.to_dict()], sort_keys=True).encode()).hexdigest()[:16]
    cache = ctx.ws.run_dir(ds) / f"joined-{key}.parquet"
    if versions and cache.exists():
        joined = pd.read_parquet(cache)
    else:
        events = pd.read_parquet(ctx.ws.events_dir(ds))
        features = [f"{USER_FEATURES_VIEW}:{name}" for name in (*spec.user_dense, *spec.user_sparse)]
        joined = store.get_historical_features(entity_df=events, features=features).to_df()
        columns = [*spec.user_dense, *spec.user_sparse]
        absent = joined[columns].isna().all(axis=1) if columns else pd.Series(False, index=joined.index)
        if absent.any():
            log.warning("%d impressions have no user features as of their time; dropped", int(absent.sum()))
            joined = joined[~absent].copy()
        # A feature declared after some users' latest feature row was written is null in those rows.
        filled = fill_missing_user_features(joined, spec)
        if filled:
            log.warning("filled user features missing from rows written before the feature existed "
                        "(dense 0.0, sparse empty): %s", filled)
        joined = joined.sort_values("impression_id").reset_index(drop=True)
        if versions:
            for stale in ctx.ws.run_dir(ds).glob("joined-*.parquet"):
                stale.unlink()
            tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}")
            joined.to_parquet(tmp, index=False)
            tmp.replace(cache)
    for name in spec.user_sparse:
        joined[name] = joined[name].map(lambda v: np.asarray(v if v is not None else [], dtype=np.int64))
    bucket = pd.util.hash_pandas_object(joined["impression_id"], index=False).to_numpy() % 10_000
    holdout = bucket < int(ctx.params.events.holdout_fraction * 10_000)
    return joined[~holdout].reset_index(drop=True), joined[holdout].reset_index(drop=True), spec


def _parent_for(snapshot_id: str, ctx: Context) -> str | None:
    """The snapshot a candidate warm-starts from; stable across reruns of the same date."""
    existing = ctx.registry.get(snapshot_id)
    if existing is not None:
        return existing.parent_id
    prod = ctx.registry.production()
    return prod.snapshot_id if prod else None


def train_user_model(ds: str, candidate_fault: str | None = None) -> dict[str, Any]:
    """Trains the day's candidate, warm-starting from the production snapshot, and exports it.

    Args:
        ds: The logical date.
        candidate_fault: Optional fault injection (``"reinit"``: export re-initialised weights), used
            to prove that the gate holds a very different candidate.

    Returns:
        The candidate's id, its parent and training statistics.
    """
    import torch

    from sum_models.model import build_model
    from sum_models.snapshot import export_snapshot, load_model
    from sum_models.train import train_model

    ctx = context()
    snapshot_id = snapshot_id_for(ds)
    train_df, _, spec = training_frame(ds, ctx)
    parent_id = _parent_for(snapshot_id, ctx)
    model = build_model(spec, ctx.params.model, seed=ctx.params.seed)
    warm = {"loaded": 0, "skipped": []}
    if parent_id:
        parent, _ = load_model(ctx.ws.snapshot_dir(parent_id))
        warm = warm_start(model, parent.state_dict())
    if candidate_fault and candidate_fault not in CANDIDATE_FAULTS:
        raise ValueError(f"unknown candidate_fault {candidate_fault!r}; known: {CANDIDATE_FAULTS}")
    train_cfg = ctx.params.train
    if candidate_fault == "explode_lr":
        train_cfg = train_cfg.model_copy(update={"learning_rate": train_cfg.learning_rate * 1000})
    try:
        stats = train_model(model, train_df, spec, train_cfg, seed=ctx.params.seed)
    except ValueError as err:
        if "non-finite training loss" not in str(err):
            raise
        # A diverged candidate is exported as it stands and judged (the gate holds non-finite weights),
        # so the verdict and its reason land in the lineage instead of a crashed run.
        log.warning("training of %s diverged: %s", snapshot_id, err)
        stats = {"diverged": str(err)}
    if candidate_fault:
        log.warning("fault injection %r on the candidate of %s", candidate_fault, ds)
        model = inject_fault(model, candidate_fault, lambda: build_model(spec, ctx.params.model, seed=ctx.params.seed + 1_000_003))
    extra = {"ds": ds, "parent_id": parent_id, "params_digest": ctx.params.digest(), "fault": candidate_fault}
    snap_dir = export_snapshot(model, spec, ctx.params.model.model_dump(), ctx.ws.snapshot_dir(snapshot_id),
                               snapshot_id, extra)
    weights_sha256 = {k: v for k, v in read_json(snap_dir / "manifest.json")["sha256"].items() if k.endswith(".safetensors")}
    data_version = read_json(ctx.ws.run_dir(ds) / "data_version.json")["versions"]
    validation = read_json(ctx.ws.run_dir(ds) / "validation.json")
    train = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
    record = {
        "data_version": data_version,
        "validation": {"success": validation["success"], "checked_at": ds},
        "params_digest": ctx.params.digest(),
        "train": train,
        "warm_start": warm,
        "weights_sha256": weights_sha256,
        "fault": candidate_fault,
        "torch_threads": torch.get_num_threads(),
    }
    ctx.registry.register_candidate(snapshot_id, ds, parent_id, record)
    return {"snapshot_id": snapshot_id, "parent_id": parent_id, "train": train, "warm_start": warm}


def inject_fault(model, fault: str, fresh_model):
    """Applies a candidate fault after training (see :data:`CANDIDATE_FAULTS`); returns the model to export."""
    import torch

    if fault == "reinit":
        return fresh_model()
    with torch.no_grad():
        if fault == "perturb":
            gen = torch.Generator().manual_seed(1_000_003)
            for p in model.parameters():
                if p.numel() > 1:
                    p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3))
        elif fault == "nan":
            next(iter(model.user_tower.parameters())).view(-1)[0] = float("nan")
    return model


def warm_start(model, parent_state: dict) -> dict[str, Any]:
    """Copies every parent tensor whose name and shape match; a changed input layer starts fresh.

    This is what lets a data scientist add a feature: the new feature's table is new, the rest of the
    model keeps what it learnt.
    """
    own = model.state_dict()
    loadable = {k: v for k, v in parent_state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    skipped = sorted(set(own) - set(loadable))
    if skipped:
        log.info("warm start: %d tensors start fresh: %s", len(skipped), skipped)
    return {"loaded": len(loadable), "skipped": skipped}


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


def evaluate(ds: str) -> dict[str, Any]:
    """NE (eq. 9) of the candidate and of the production snapshot on the day's holdout."""
    from sum_models.snapshot import load_model
    from sum_models.train import evaluate_ne

    ctx = context()
    snapshot_id = snapshot_id_for(ds)
    _, holdout, spec = training_frame(ds, ctx)
    candidate, _ = load_model(ctx.ws.snapshot_dir(snapshot_id))
    try:
        ne = evaluate_ne(candidate, holdout, spec)
    except ValueError as err:  # non-finite predictions: a verdict for the gate, not a crash
        log.warning("candidate %s cannot be scored: %s", snapshot_id, err)
        ne = {task: None for task in spec.labels}
    result: dict[str, Any] = {"ds": ds, "snapshot_id": snapshot_id, "holdout_rows": len(holdout), "ne": ne}
    history = baseline_history(snapshot_id, ctx)
    if history:
        production, _ = load_model(ctx.ws.snapshot_dir(history[0]))
        try:
            result["production_ne"] = evaluate_ne(production, holdout, production.spec)
        except RuntimeError as err:  # input layers changed since production was trained
            log.warning("production snapshot cannot score today's inputs: %s", err)
        result["production_id"] = history[0]
    write_json(ctx.ws.run_dir(ds) / "evaluation.json", result)
    ctx.registry.update_record(snapshot_id, {"evaluation": result})
    return result


def probe_user_frame(ds: str, ctx: Context):
    """Today's features of the fixed probe users (the first ``gate.probe_users`` users ever seen)."""
    import pandas as pd

    users = pd.read_parquet(ctx.ws.users_dir(ds))
    if not ctx.ws.probe_users.exists():
        ids = users["user_id"].sort_values().head(ctx.params.gate.probe_users)
        tmp = ctx.ws.probe_users.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        ids.to_frame().to_parquet(tmp, index=False)
        tmp.replace(ctx.ws.probe_users)
    probe = pd.read_parquet(ctx.ws.probe_users)["user_id"]
    frame = users[users["user_id"].isin(probe)].sort_values("user_id").reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"none of the probe users appear in the users partition of {ds}")
    return frame


def shift_gate(ds: str) -> dict[str, Any]:
    """Judges the candidate (validation.gate) and records the verdict in the registry.

    The baseline is the production snapshot (on a rerun after promotion: the snapshot it replaced);
    the versions before it feed the average-pooled comparison.
    """
    import numpy as np
    import torch

    from sum_models.snapshot import embed_users, load_model, load_user_tower
    from validation.gate import judge

    ctx = context()
    snapshot_id = snapshot_id_for(ds)
    probe = probe_user_frame(ds, ctx)
    model, _ = load_model(ctx.ws.snapshot_dir(snapshot_id))
    weights_finite = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    tower, _ = load_user_tower(ctx.ws.snapshot_dir(snapshot_id))
    # Each tower reads the inputs it was built for (a feature added today is new to production).
    try:
        candidate = embed_users(tower, probe, tower.spec)
    except ValueError as err:  # NaN / fp16 overflow: held by the gate's finiteness check
        log.warning("candidate %s gives unusable embeddings: %s", snapshot_id, err)
        k, d = tower.num_embeddings, tower.embedding_dim
        candidate = np.full((len(probe), k, d), np.nan, dtype=np.float32)
    evaluation = read_json(ctx.ws.run_dir(ds) / "evaluation.json")
    history = baseline_history(snapshot_id, ctx)
    embeddings = []
    for sid in history[:3]:
        old_tower, _ = load_user_tower(ctx.ws.snapshot_dir(sid))
        embeddings.append(embed_users(old_tower, probe, old_tower.spec))
    baseline = history[0] if history else None
    production_ne = evaluation.get("production_ne") if evaluation.get("production_id") == baseline else None
    verdict = judge(
        candidate, embeddings[0] if embeddings else None, evaluation["ne"], ctx.params.gate, baseline,
        history=embeddings[1:], production_ne=production_ne, weights_finite=weights_finite,
    )
    payload = verdict.to_dict() | {"ds": ds, "snapshot_id": snapshot_id, "probe_users": len(probe),
                                   "thresholds": ctx.params.gate.model_dump()}
    write_json(ctx.ws.run_dir(ds) / "gate.json", payload)
    ctx.registry.record_verdict(snapshot_id, verdict.blessed, payload)
    log.info("gate verdict for %s: %s; %s", snapshot_id, verdict.label, "; ".join(verdict.reasons) or "all checks passed")
    return payload


# ---------------------------------------------------------------------------------------------
# promote -> materialize -> rollout -> verify
# ---------------------------------------------------------------------------------------------
def promote(ds: str, actor: str = "pipeline", reason: str = "gate blessed") -> dict[str, Any]:
    """Versions the blessed snapshot (DVC + GTO tag) and makes it production in the registry."""
    return promote_snapshot(context(), snapshot_id_for(ds), actor=actor, reason=reason)


def promote_snapshot(ctx: Context, snapshot_id: str, actor: str, reason: str, force: bool = False) -> dict[str, Any]:
    """Promotion proper: files pushed and tagged first, then the registry flips in one transaction."""
    from sum_platform.versioning import data_version, tag_promotion, track_paths

    record = ctx.registry.get(snapshot_id)
    if record is None:
        raise LookupError(f"unknown snapshot {snapshot_id!r}")
    blessed = bool((record.record.get("verdict") or {}).get("blessed"))
    if not force and record.stage != "production" and not (record.stage == "candidate" and blessed):
        state = record.stage if record.stage != "candidate" else "a candidate the gate has not blessed"
        raise RuntimeError(f"snapshot {snapshot_id} is {state}; use --force with a reason to override")
    snap_dir = ctx.ws.snapshot_dir(snapshot_id)
    track_paths(ctx.ws.root, [snap_dir], f"snapshot: {snapshot_id}")
    tag = tag_promotion(ctx.ws.root, snapshot_id, f"promote {snapshot_id}: {reason}")
    ctx.registry.update_record(snapshot_id, {"snapshot_version": data_version(ctx.ws.root, snap_dir), "tag": tag})
    promoted = ctx.registry.promote(snapshot_id, actor=actor, reason=reason, force=force)
    return {"snapshot_id": snapshot_id, "tag": tag, "stage": promoted.stage, "promoted_at": promoted.promoted_at}


def materialize_embeddings(ds: str) -> dict[str, Any]:
    """Batch inference of every user with the production snapshot; written offline and online."""
    import pandas as pd

    from serving.store_io import write_embeddings
    from sum_models.snapshot import embed_users, load_user_tower
    from sum_platform.feature_store import apply_definitions
    from sum_platform.simulate import write_frame

    ctx = context()
    prod = ctx.registry.production()
    if prod is None:
        raise RuntimeError("no production snapshot to materialize")
    store = apply_definitions(ctx.params)
    users = pd.read_parquet(ctx.ws.users_dir(ds)).sort_values("user_id").reset_index(drop=True)
    tower, _ = load_user_tower(ctx.ws.snapshot_dir(prod.snapshot_id))
    emb = embed_users(tower, users, tower.spec)
    written_at = datetime.fromisoformat(ds).replace(tzinfo=timezone.utc) + timedelta(days=1) - timedelta(seconds=1)
    # The same pooled write as SOAP's compute (paper 5.2: mean of this version and the 2 stored before),
    # marked as the day's batch value (what offline mode serves); the offline copy is the stored rows.
    offline = write_embeddings(store, users["user_id"].to_numpy(), emb, prod.snapshot_id, written_at,
                               batch=True, return_frame=True)
    write_frame(offline, ctx.ws.embeddings_dir(ds))
    return {"ds": ds, "snapshot_id": prod.snapshot_id, "users": len(users)}


def rollout(ds: str) -> dict[str, Any]:
    """Moves the serving app to the production snapshot; rolls back to the previous one on failure."""
    from serving.ray_cluster import ensure_ray
    from serving.rollout import RolloutError
    from serving.rollout import rollout as serve_rollout

    ctx = context()
    prod = ctx.registry.production()
    if prod is None:
        raise RuntimeError("no production snapshot to roll out")
    previous = None
    if prod.parent_id and ctx.ws.snapshot_dir(prod.parent_id).exists():
        previous = (ctx.ws.snapshot_dir(prod.parent_id), prod.parent_id)
    # Frozen mode computes with the first snapshot ever promoted (paper 6.4, "frozen user model").
    first = min(ctx.registry.promoted_history(), key=lambda r: (r.ds, r.snapshot_id), default=None)
    frozen = (ctx.ws.snapshot_dir(first.snapshot_id), first.snapshot_id) if first else None
    if frozen and not frozen[0].exists():
        frozen = None
    ensure_ray(ctx.params)
    try:
        result = serve_rollout(ctx.params, ctx.ws.snapshot_dir(prod.snapshot_id), prod.snapshot_id,
                               previous=previous, frozen=frozen)
    except RolloutError as err:  # rolled back (or not): recorded on the snapshot that failed to roll out
        ctx.registry.update_record(prod.snapshot_id, {"rollout": err.record})
        raise
    ctx.registry.update_record(prod.snapshot_id, {"rollout": result["record"]})
    return {"ds": ds, "snapshot_id": prod.snapshot_id, **(result or {})}


def verify_serving(ds: str) -> dict[str, Any]:
    """Checks that the endpoint serves the registry's production snapshot and answers a user."""
    import httpx
    import pandas as pd

    from serving.rollout import base_url, served_snapshot_id

    ctx = context()
    prod = ctx.registry.production()
    served = served_snapshot_id(ctx.params)
    if prod is None or served != prod.snapshot_id:
        raise RuntimeError(f"serving reports {served!r}, registry production is {prod.snapshot_id if prod else None!r}")
    user_id = int(pd.read_parquet(ctx.ws.users_dir(ds), columns=["user_id"])["user_id"].min())
    url = f"{base_url(ctx.params)}/users/{user_id}/embeddings"
    resp = httpx.get(url, timeout=30)
    if resp.status_code != 200:
        raise RuntimeError(f"GET {url} -> {resp.status_code}: {resp.text[:300]}")
    body = resp.json()
    return {"ds": ds, "served_snapshot_id": served, "probe_user": user_id, "user_snapshot_id": body.get("snapshot_id")}


# ---------------------------------------------------------------------------------------------
# operator actions
# ---------------------------------------------------------------------------------------------
def rollback_production(actor: str, reason: str, to: str | None = None, reroll: bool = True) -> dict[str, Any]:
    """Makes the previous production snapshot (or ``to``) current again and re-rolls serving.

    Args:
        actor: Who rolls back (recorded).
        reason: Why (recorded).
        to: A snapshot that was production before; defaults to the one promoted before the current.
        reroll: Move a running serving app to it (skipped with a note when no serving app answers).

    Returns:
        What changed: from, to, the GTO tag and the serving outcome.
    """
    from serving.rollout import served_snapshot_id

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
        from serving.ray_cluster import ensure_ray
        from serving.rollout import rollout as serve_rollout

        ensure_ray(ctx.params)
        result = serve_rollout(ctx.params, ctx.ws.snapshot_dir(target), target,
                               previous=(ctx.ws.snapshot_dir(current), current))
        out["serving"] = result
    ctx.registry.update_record(target, {"rollback": out | {"actor": actor, "reason": reason}})
    return out
