"""The daily SUM loop as plain functions: one per DAG task, each idempotent for its date ``ds``.

The Airflow DAG (``dags/sum_daily.py``), ``sumctl stage`` and ``dvc repro`` call these; none of them
needs Airflow. A task reads the params in force and the workspace (:func:`sum_platform.context.context`),
reads and writes the date's state through its :class:`~sum_platform.day_record.DayRecord`, writes files
atomically, and returns a small JSON-able summary (Airflow's XCom) that carries the snapshot id on.
Promotion and rollback live in :mod:`sum_pipeline.promotion`, candidate faults in :mod:`sum_pipeline.faults`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from serving.ray_cluster import connect_ray, ensure_ray
from serving.rollout import RolloutError, auth_headers, base_url, served_snapshot_id
from serving.rollout import rollout as serve_rollout
from serving.store_io import log_offline, write_embeddings
from sum_models.metrics import NormalizedEntropy
from sum_pipeline.batch_embeddings import embed_with_ray_data
from sum_pipeline.check_consumers import check_consumers  # noqa: F401 (a stage: sumctl stage check_consumers)
from sum_pipeline.faults import EXPLODE_LR_FACTOR, FAULT_SEED_OFFSET, check_fault, consumer_projections, inject_fault
from sum_pipeline.promotion import baseline_history, frozen_snapshot, parent_for, promote_snapshot
from sum_platform.context import Context, context
from sum_platform.feature_store import apply_definitions, feature_spec, get_store, user_features_view
from sum_platform.files import disk_full, read_json, write_parquet, write_partition
from sum_platform.partitions import read_partition
from sum_platform.sources import day_frames
from sum_platform.versioning import data_version, init_workspace_repo, track_paths
from sum_platform.workspace import snapshot_id_for
from sum_models.shift import POOL_DEPTH
from validation.data_checks import DataValidationError, validate_day
from validation.consumers import left_out_of_training
from validation.gate import judge
from validation.quarantine import quarantine_partition, quarantined, reason_from_error

log = logging.getLogger(__name__)

#: The DAG's tasks in the order of one day (``sumctl stage`` names, ``dvc.yaml`` stages, the DAG's task ids).
STAGES = ("ingest", "validate_data", "version_data", "materialize_user_features", "train_user_model", "evaluate",
          "check_consumers", "shift_gate", "promote", "materialize_embeddings", "rollout", "verify_serving")

#: The holdout is a fixed hash-based share of impressions, in buckets of 1/10,000.
_HOLDOUT_BUCKETS = 10_000


# ---------------------------------------------------------------------------------------------
# ingest -> validate -> version data
# ---------------------------------------------------------------------------------------------
def ingest(ds: str) -> dict[str, Any]:
    """Makes the day's partitions available: the configured source (``source.kind``: the simulator, MovieLens
    or the user's own parquet files, :mod:`sum_platform.sources`) writes the ones that are missing.

    An existing partition (delivered by an upstream, dropped in place by an operator, or deliberately
    corrupted by a test) is left alone, so validation judges exactly what arrived; after a quarantine the
    folders are absent and a rerun ingests the fixed partition (see :mod:`validation.quarantine`).

    Returns:
        ``written`` (True when anything was simulated), ``simulated`` (which partitions), and, when the date
        was quarantined before, ``quarantined_before`` (how often) and ``latest_quarantine``.
    """
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
    source = ctx.params.source.kind
    if not missing:
        return {"ds": ds, "written": False, "source": source, "simulated": [], **extra}
    frames = dict(zip(("events", "users"), day_frames(ds, ctx.params)))
    for kind in missing:  # an operator's partition in place is kept; only the missing one is written
        write_partition(frames[kind], folders[kind])
    if len(missing) < len(folders):
        log.info("ds=%s: wrote the missing %s partition(s) from the %s source, kept %s in place", ds, missing,
                 source, sorted(set(folders) - set(missing)))
    # ``simulated`` names what the source wrote (kept under that name: the run notes and tests read it).
    return {"ds": ds, "written": True, "source": source, "simulated": missing,
            **{k: len(frames[k]) for k in missing}, **extra}


def apply_features(ds: str, ctx: Context | None = None):
    """Applies the feature repo to the workspace store (the day's one Feast apply) and records the spec.

    Every later task of the date builds the model's inputs from the recorded spec (:attr:`DayRecord.spec`)
    instead of re-executing the feature repo. Returns the :class:`~sum_models.spec.FeatureSpec`.
    """
    ctx = ctx or context()
    spec = feature_spec(ctx.params, apply_definitions(ctx.params))
    ctx.day(ds).write_spec(spec)
    return spec


def validate_data(ds: str) -> dict[str, Any]:
    """Applies the feature repo (:func:`apply_features`), runs the GX checkpoints, records the result.

    On a failure (``DataValidationError``, naming every failed check) the day's
    partitions are quarantined (:mod:`validation.quarantine`), the failure is recorded, and the error is
    re-raised: the run stops here. Data Docs are built on every run; their location is returned.
    """
    ctx = context()
    day = ctx.day(ds)
    spec = apply_features(ds, ctx)
    try:
        reports = validate_day(ds, ctx.ws.root, spec, ctx.params)
    except DataValidationError as err:
        folder = quarantine_partition(ctx.ws, ds, reason_from_error(err))
        err.set_quarantine(folder)
        docs = next((r.data_docs_index for r in err.reports if r.data_docs_index), None)
        day.write("validation", {
            "ds": ds, "success": False, "error": str(err), "failed_checks": err.failed_checks,
            "quarantine": str(folder), "data_docs": docs, "reports": [r.to_dict() for r in err.reports]})
        print(f"Data Docs: {docs}\nds={ds} QUARANTINED to {folder}", flush=True)
        raise
    docs = next((r.data_docs_index for r in reports if r.data_docs_index), None)
    day.write("validation", {"ds": ds, "success": True, "data_docs": docs, "reports": [r.to_dict() for r in reports]})
    print("\n".join([f"Data Docs: {docs}"] + [r.summary() for r in reports]), flush=True)
    return {
        "ds": ds, "success": True, "evaluated": sum(r.evaluated for r in reports), "data_docs": docs,
        "warnings": {r.kind: r.warnings for r in reports if r.warnings},
        "skipped": {r.kind: r.skipped for r in reports if r.skipped},
        "baseline": next((r.baseline for r in reports if r.baseline), {}),
    }


def version_data(ds: str) -> dict[str, Any]:
    """Tracks the validated partitions with DVC, pushes them, commits the ``.dvc`` files."""
    ctx = context()
    paths = [ctx.ws.events_dir(ds), ctx.ws.users_dir(ds)]
    commit = track_paths(ctx.ws.root, paths, f"data: partitions of {ds}")
    versions = {p.relative_to(ctx.ws.root).as_posix(): data_version(ctx.ws.root, p) for p in paths}
    ctx.day(ds).write("data_version", {"ds": ds, "commit": commit, "versions": versions})
    return {"ds": ds, "versions": versions}


def materialize_user_features(ds: str) -> dict[str, Any]:
    """Loads the day's user features into the online store (Feast materialize over the day)."""
    ctx = context()
    start = datetime.fromisoformat(ds).replace(tzinfo=timezone.utc)
    view = user_features_view(ctx.params)
    get_store(ctx.params).materialize(start_date=start - timedelta(seconds=1), end_date=start + timedelta(days=1),
                                      feature_views=[view])
    return {"ds": ds, "view": view}


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

    day = ctx.day(ds)
    spec = day.spec
    # The join is the slow part; train and evaluate share it through a cache keyed by the data version and
    # the feature spec, so a fixed partition or a new feature never reads stale rows.
    versions = (day.data_version or {}).get("versions", {})
    key = hashlib.sha256(json.dumps([versions, spec.to_dict()], sort_keys=True).encode()).hexdigest()[:16]
    cache = day.joined_cache(key)
    if versions and cache.exists():
        joined = pd.read_parquet(cache)
    else:
        events = read_partition(ctx.ws.events_dir(ds))
        view = user_features_view(ctx.params)
        features = [f"{view}:{name}" for name in (*spec.user_dense, *spec.user_sparse)]
        joined = get_store(ctx.params).get_historical_features(entity_df=events, features=features).to_df()
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
            for stale in day.stale_joins(key):
                stale.unlink()
            write_parquet(joined, cache)
    for name in spec.user_sparse:
        joined[name] = joined[name].map(lambda v: np.asarray(v if v is not None else [], dtype=np.int64))
    holdout = holdout_mask(joined, ctx.params.events.holdout_fraction)
    # The consumer check scores the downstream models on users the candidate never trained on.
    unseen = left_out_of_training(joined["user_id"].to_numpy(), ctx.params.gate)
    return joined[~holdout & ~unseen].reset_index(drop=True), joined[holdout].reset_index(drop=True), spec


def holdout_mask(impressions, fraction: float):
    """The fixed holdout: a hash of ``impression_id`` picks ``fraction`` of impressions, the same on every rerun."""
    import pandas as pd

    bucket = pd.util.hash_pandas_object(impressions["impression_id"], index=False).to_numpy() % _HOLDOUT_BUCKETS
    return bucket < int(fraction * _HOLDOUT_BUCKETS)


def train_user_model(ds: str, candidate_fault: str | None = None) -> dict[str, Any]:
    """Trains the day's candidate, warm-starting from the production snapshot, and exports it.

    Args:
        ds: The logical date.
        candidate_fault: Optional fault injection (:data:`sum_pipeline.faults.CANDIDATE_FAULTS`), used to
            prove that the gate holds a very different candidate.

    Returns:
        The candidate's id, its parent and training statistics.
    """
    import torch

    from sum_models.data import encode_users
    from sum_models.model import build_model
    from sum_models.snapshot import MANIFEST_FILE, export_snapshot, load_model

    check_fault(candidate_fault)
    ctx = context()
    snapshot_id = snapshot_id_for(ds)
    train_df, _, spec = training_frame(ds, ctx)
    parent_id = parent_for(snapshot_id, ctx)
    model = build_model(spec, ctx.params.model, seed=ctx.params.seed)
    warm = {"loaded": 0, "skipped": []}
    if parent_id:
        parent, _ = load_model(ctx.ws.snapshot_dir(parent_id))
        warm = warm_start(model, parent.state_dict())
    train_cfg = ctx.params.train
    if candidate_fault == "explode_lr":
        train_cfg = train_cfg.model_copy(update={"learning_rate": train_cfg.learning_rate * EXPLODE_LR_FACTOR})
    try:
        stats = _train(model, train_df, spec, train_cfg, ctx, ds)
    except ValueError as err:
        if "non-finite training loss" not in str(err):
            raise
        # A diverged candidate is exported as it stands and judged (the gate holds non-finite weights),
        # so the verdict and its reason land in the lineage instead of a crashed run.
        log.warning("training of %s diverged: %s", snapshot_id, err)
        stats = {"diverged": str(err)}
    if candidate_fault:
        log.warning("fault injection %r on the candidate of %s", candidate_fault, ds)
        model = inject_fault(
            model, candidate_fault,
            lambda: build_model(spec, ctx.params.model, seed=ctx.params.seed + FAULT_SEED_OFFSET),
            users=lambda: encode_users(train_df.drop_duplicates(ctx.params.events.user_id), spec),
            consumers=lambda: consumer_projections(ctx.ws.root / "downstream", ds, ctx.params.downstream.models))
    extra = {"ds": ds, "parent_id": parent_id, "params_digest": ctx.params.digest(), "fault": candidate_fault}
    try:  # atomic: a temporary folder beside the snapshot's, renamed when whole, removed on any error
        snap_dir = export_snapshot(model, spec, ctx.params.model.model_dump(), ctx.ws.snapshot_dir(snapshot_id),
                                   snapshot_id, extra)
    except Exception as exc:
        full = disk_full(exc, ctx.ws.snapshot_dir(snapshot_id).parent, f"exporting snapshot {snapshot_id}")
        if full is None:
            raise
        raise full from exc
    manifest = read_json(snap_dir / MANIFEST_FILE)
    train = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
    # A rerun replaces the whole record: the evaluation and verdict of an earlier candidate do not carry over.
    record = ctx.day(ds).lineage("data_version", "validation") | {
        "params_digest": ctx.params.digest(),
        "train": train,
        "warm_start": warm,
        "weights_sha256": {k: v for k, v in manifest["sha256"].items() if k.endswith(".safetensors")},
        "fault": candidate_fault,
        "torch_threads": torch.get_num_threads(),
        "train_workers": ctx.params.train.workers,
    }
    ctx.registry.register_candidate(snapshot_id, ds, parent_id, record)
    return {"snapshot_id": snapshot_id, "parent_id": parent_id, "train": train, "warm_start": warm}


def _train(model, train_df, spec, train_cfg, ctx: Context, ds: str):
    """The day's training: the loop in this process, or with ``train.workers`` > 1 a Ray Train run on the
    cluster (:mod:`sum_models.distributed`: same loop, same export, judged the same way)."""
    if train_cfg.workers <= 1:
        from sum_models.train import train_model

        return train_model(model, train_df, spec, train_cfg, seed=ctx.params.seed)
    from sum_models.distributed import train_model_ray

    connect_ray(ctx.params)
    log.info("training on %d Ray Train workers (%.2f CPU, %d thread(s) each)", train_cfg.workers,
             train_cfg.cpus_per_worker, train_cfg.threads_per_worker)
    return train_model_ray(model, train_df, spec, train_cfg, seed=ctx.params.seed, workers=train_cfg.workers,
                           cpus_per_worker=train_cfg.cpus_per_worker, threads_per_worker=train_cfg.threads_per_worker,
                           storage_path=ctx.ws.run_dir(ds) / "ray_train", run_name=f"train-{ds}")


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


def evaluate(ds: str, snapshot_id: str | None = None) -> dict[str, Any]:
    """NE (eq. 9) of the candidate and of the production snapshot on the day's holdout.

    Both are scored on the same rows: those whose inputs are finite and whose predictions are finite under both
    models. The others are counted in ``nonfinite`` (``inputs``: a non-finite feature; ``production``: production's
    prediction is NaN/inf too, so the row's data is the cause; ``candidate``: only the candidate's is, which the
    gate holds) instead of failing the task or every row's score.
    """
    import numpy as np

    from sum_models.data import encode_labels, finite_rows
    from sum_models.snapshot import load_model, skipped_users
    from sum_models.train import predict_proba

    ctx = context()
    snapshot_id = snapshot_id or snapshot_id_for(ds)
    _, holdout, spec = training_frame(ds, ctx)
    candidate, _ = load_model(ctx.ws.snapshot_dir(snapshot_id))
    history = baseline_history(snapshot_id, ctx)
    production = load_model(ctx.ws.snapshot_dir(history[0]))[0] if history else None
    dense = {*spec.user_dense, *spec.ad_dense, *((production.spec.user_dense + production.spec.ad_dense)
                                                 if production is not None else ())}
    users = holdout["user_id"].to_numpy()
    reasons = np.where(finite_rows(holdout, sorted(dense)), "", "inputs").astype(object)
    scored = holdout[reasons == ""]

    def probs(model, model_spec, who: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(row finite and in [0, 1], probabilities)`` of ``scored``; None when the model cannot score it."""
        if scored.empty:
            return None
        try:
            p = predict_proba(model, scored, model_spec)
        except (RuntimeError, ValueError) as err:  # e.g. input layers changed since production was trained
            log.warning("the %s snapshot cannot score today's holdout: %s", who, err)
            return None
        with np.errstate(invalid="ignore"):
            return np.isfinite(p).all(axis=1) & (p >= 0).all(axis=1) & (p <= 1).all(axis=1), p

    cand = probs(candidate, spec, "candidate")
    prod = probs(production, production.spec, "production") if production is not None else None
    idx = np.flatnonzero(reasons == "")
    if prod is not None:
        reasons[idx[~prod[0]]] = "production"  # production's prediction not finite either: the row's data
    if cand is not None:
        reasons[idx[(reasons[idx] == "") & ~cand[0]]] = "candidate"
    use = reasons[idx] == ""
    undefined: dict[str, str] = {}
    ne: dict[str, Any] = {task: None for task in spec.labels}
    # What each task's NE (and production's, on the same rows) rests on: the gate needs enough of each label.
    evidence: dict[str, dict[str, int]] = {}
    if scored.empty or (cand is not None and not use.any()):
        undefined = {task: f"no holdout row with finite inputs and predictions (of {len(holdout)})"
                     for task in spec.labels}
        evidence = {task: {"holdout_rows": 0, "positives": 0} for task in spec.labels}
    elif cand is not None:
        # A task whose holdout holds one label class (a small day without a conversion) is not measurable
        # today: None, with the reason in ne_undefined, which the gate reports as not measurable.
        labels = encode_labels(scored, spec).numpy()
        acc = NormalizedEntropy(spec.labels).update(cand[1][use], labels[use])
        measured, undefined = acc.compute_defined()
        ne = {task: measured.get(task) for task in spec.labels}
        evidence = acc.evidence()
    nonfinite = skipped_users(users, reasons)
    result: dict[str, Any] = {"ds": ds, "snapshot_id": snapshot_id, "holdout_rows": len(holdout),
                              "scored_rows": int(use.sum()), "ne": ne, "ne_undefined": undefined,
                              "ne_evidence": evidence, "nonfinite": nonfinite}
    if undefined:
        log.warning("NE not measurable on the holdout of %s: %s", ds, undefined)
    for reason, what in nonfinite.items():
        log.warning("evaluate %s: %d holdout row(s) not scored (%s non-finite), users e.g. %s",
                    snapshot_id, what["count"], reason, what["users"])
    if production is not None:
        if prod is not None and use.any():
            prod_labels = encode_labels(scored, production.spec).numpy()
            result["production_ne"], _ = NormalizedEntropy(production.spec.labels).update(
                prod[1][use], prod_labels[use]).compute_defined()
        result["production_id"] = history[0]
    day = ctx.day(ds)
    day.write("evaluation", result)
    ctx.registry.update_record(snapshot_id, day.lineage("evaluation"))
    return result


def probe_user_frame(ds: str, ctx: Context):
    """Today's features of the fixed probe users (the first ``gate.probe_users`` users ever seen)."""
    import pandas as pd

    users = read_partition(ctx.ws.users_dir(ds))
    if not ctx.ws.probe_users.exists():
        ids = users["user_id"].sort_values().head(ctx.params.gate.probe_users)
        write_parquet(ids.to_frame(), ctx.ws.probe_users)
    probe = pd.read_parquet(ctx.ws.probe_users)["user_id"]
    frame = users[users["user_id"].isin(probe)].sort_values("user_id").reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"none of the probe users appear in the users partition of {ds}")
    return frame


def shift_gate(ds: str, snapshot_id: str | None = None) -> dict[str, Any]:
    """Judges the candidate (validation.gate) and records the verdict in the registry.

    The baseline is the production snapshot (on a rerun after promotion: the snapshot it replaced);
    the versions before it feed the average-pooled comparison (``POOL_DEPTH`` versions in all).
    """
    import numpy as np

    import torch

    from sum_models.snapshot import embed_users_finite, load_model, load_user_tower, skipped_users

    ctx = context()
    day = ctx.day(ds)
    snapshot_id = snapshot_id or snapshot_id_for(ds)
    probe = probe_user_frame(ds, ctx)
    model, _ = load_model(ctx.ws.snapshot_dir(snapshot_id))  # once: its weights and its user tower
    weights_finite = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    tower = model.user_tower.eval()
    # Each tower reads the inputs it was built for (a feature added today is new to production).
    candidate, cand_skipped = embed_users_finite(tower, probe, tower.spec)
    evaluation = day.require("evaluation", "evaluate")
    history = baseline_history(snapshot_id, ctx)
    embeddings = []
    # A probe user whose inputs are not finite, or whose embedding by a baseline tower is not, says nothing about
    # the candidate (its data is the cause): left out and counted. A non-finite embedding by the candidate alone
    # stays in, and the gate's finiteness check holds the candidate.
    data_skips = np.where(cand_skipped == "nonfinite_features", "nonfinite_features", "").astype(object)
    for sid in history[:POOL_DEPTH]:
        old_tower, _ = load_user_tower(ctx.ws.snapshot_dir(sid))
        emb, skipped = embed_users_finite(old_tower, probe, old_tower.spec)
        newly = (data_skips == "") & (skipped != "")
        data_skips[newly] = "baseline_" + skipped[newly]  # e.g. baseline_nonfinite_embedding
        embeddings.append(emb)
    keep = data_skips == ""
    probe_skipped = skipped_users(probe["user_id"].to_numpy(), data_skips)
    if keep.any() and not keep.all():
        candidate, embeddings = candidate[keep], [e[keep] for e in embeddings]
    baseline = history[0] if history else None
    production_ne = evaluation.get("production_ne") if evaluation.get("production_id") == baseline else None
    consumers = day.read("consumers")
    if consumers is not None and consumers.get("snapshot_id") != snapshot_id:
        consumers = None  # another candidate's table (a rerun of train without check_consumers): not this one's
    verdict = judge(
        candidate, embeddings[0] if embeddings else None, evaluation["ne"], ctx.params.gate, baseline,
        history=embeddings[1:], candidate_id=snapshot_id, history_ids=history[1:len(embeddings)],
        pool_unit=ctx.params.serving.pool_unit, production_ne=production_ne, weights_finite=weights_finite,
        unmeasured=evaluation.get("ne_undefined"), ne_evidence=evaluation.get("ne_evidence"),
        enforce_shift=len(history) >= ctx.params.gate.warmup_promotions,
        nonfinite_predictions=(evaluation.get("nonfinite") or {}).get("candidate"),
        consumers=None if consumers is None else consumers["consumers"],
    )
    if consumers is not None and consumers.get("note"):
        verdict.reasons.append(f"consumer check: {consumers['note']}")
    elif consumers is None and ctx.params.gate.mode != "proxies":
        verdict.reasons.append(f"consumer check not run for {snapshot_id} (check_consumers): the proxies decide")
    for reason, what in probe_skipped.items():
        verdict.reasons.append(f"{what['count']} probe user(s) left out ({reason}: their data, not the candidate), "
                               f"e.g. {what['users']}")
    payload = verdict.to_dict() | {"ds": ds, "snapshot_id": snapshot_id, "probe_users": int(keep.sum()) if keep.any()
                                   else len(probe), "probe_skipped": probe_skipped,
                                   "thresholds": ctx.params.gate.model_dump()}
    day.write("verdict", payload)
    ctx.registry.record_verdict(snapshot_id, verdict.blessed, day.lineage("verdict")["verdict"])
    log.info("gate verdict for %s: %s; %s", snapshot_id, verdict.label, "; ".join(verdict.reasons) or "all checks passed")
    return payload


# ---------------------------------------------------------------------------------------------
# promote -> materialize -> rollout -> verify
# ---------------------------------------------------------------------------------------------
def promote(ds: str, snapshot_id: str | None = None, actor: str = "pipeline", reason: str = "gate blessed",
            force: bool = False) -> dict[str, Any]:
    """Versions the blessed snapshot (DVC + GTO tag) and makes it production in the registry.

    ``force`` promotes a snapshot the gate held (a human approved it); ``actor`` and ``reason`` go to the
    registry's lineage either way.
    """
    return promote_snapshot(context(), snapshot_id or snapshot_id_for(ds), actor=actor, reason=reason, force=force)


def approval_override(approval: dict[str, Any] | None) -> dict[str, Any]:
    """``promote``'s arguments for a day whose gate verdict was answered in Airflow.

    Args:
        approval: ``approve_held``'s return value (the human-in-the-loop answer: ``chosen_options``,
            ``params_input``, ``responded_by_user``), or None when the gate blessed the candidate (the
            approval was skipped).

    Returns:
        ``{}`` for a blessed candidate; for an approved held one ``force=True`` with the responding user
        as ``actor`` and their ``reason``.

    Raises:
        ValueError: an answer other than an approval by a named user (a rejection or a timeout skips
            ``promote``, so reaching here with one is a wiring error).
    """
    if approval is None:
        return {}
    user = approval.get("responded_by_user") or {}
    if approval.get("chosen_options") != ["Approve"] or not user.get("name"):
        raise ValueError(f"not an approval by a user: {approval}")
    reason = ((approval.get("params_input") or {}).get("reason") or "").strip() or "no reason given"
    return {"force": True, "actor": user["name"], "reason": f"held candidate approved in Airflow: {reason}"}


def _production(ctx: Context, expected: str | None, action: str):
    """The production record; ``expected`` (the id this run promoted) must still be it."""
    prod = ctx.registry.production()
    if prod is None:
        raise RuntimeError(f"no production snapshot to {action}")
    if expected is not None and prod.snapshot_id != expected:
        raise RuntimeError(f"production is {prod.snapshot_id}, not {expected} as promoted by this run "
                           f"(promoted or rolled back since?): not going to {action} it")
    return prod


def materialize_embeddings(ds: str, snapshot_id: str | None = None) -> dict[str, Any]:
    """Batch inference of every user with the production snapshot; written offline and online.

    ``inference.engine``: ``task`` embeds in this process; ``ray_data`` on the Ray cluster
    (:mod:`sum_pipeline.batch_embeddings`), written here batch by batch. The same rows either way.
    """
    import numpy as np
    import pandas as pd

    ctx = context()
    prod = _production(ctx, snapshot_id, "materialize")
    snap_dir = ctx.ws.snapshot_dir(prod.snapshot_id)
    store = get_store(ctx.params)
    cfg = ctx.params.inference
    written_at = datetime.fromisoformat(ds).replace(tzinfo=timezone.utc) + timedelta(days=1) - timedelta(seconds=1)
    # The same pooled write as SOAP's compute (paper 5.2; serving.pool_unit: this version with the latest ones of
    # the previous snapshots, or of the previous writes),
    # marked as the day's batch value (what offline mode serves), logged to the day's offline partition
    # beside the day's write-backs under a fixed name (a rerun replaces it).
    # A user whose features or embedding are not finite is skipped and counted (its stored value stays): one bad
    # row must not cost every other user today's batch value.
    from sum_models.snapshot import MANIFEST_FILE, skipped_users

    if cfg.engine == "task":
        from sum_models.runtime import torch_threads
        from sum_models.snapshot import embed_users_finite, load_user_tower

        users = read_partition(ctx.ws.users_dir(ds)).sort_values("user_id").reset_index(drop=True)
        tower, _ = load_user_tower(snap_dir)
        with torch_threads(1):  # as each Ray Data actor: the same arithmetic, the same bits
            emb, skipped = embed_users_finite(tower, users, tower.spec, batch_size=cfg.batch_size)
        ids, ok = users["user_id"].to_numpy(), skipped == ""
        written = write_embeddings(store, ids[ok], emb[ok], prod.snapshot_id, written_at,
                                   unit=ctx.params.serving.pool_unit, batch=True, to_offline=True,
                                   offline_file="batch.parquet")
        return _materialized(ctx, ds, prod.snapshot_id, written, cfg.engine, skipped_users(ids, skipped))
    connect_ray(ctx.params)
    manifest = read_json(snap_dir / MANIFEST_FILE)
    frames, all_ids, all_skipped = [], [], []
    for ids, emb, skipped in embed_with_ray_data(ctx.ws.users_dir(ds), snap_dir, (manifest["num_embeddings"],
                                                 manifest["embedding_dim"]), batch_size=cfg.batch_size,
                                                 actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor):
        ok = skipped == ""
        all_ids.append(ids)
        all_skipped.append(skipped)
        if ok.any():
            frames.append(write_embeddings(store, ids[ok], emb[ok], prod.snapshot_id, written_at, batch=True,
                                           unit=ctx.params.serving.pool_unit, return_frame=True))
        log.info("materialize_embeddings: %d users written", sum(len(f) for f in frames))
    rows = pd.concat(frames).sort_values("user_id").reset_index(drop=True) if frames else pd.DataFrame()
    if len(rows):
        log_offline(store, rows, "batch.parquet")  # one file for the day's batch, as the in-task path writes
    skips = skipped_users(np.concatenate(all_ids), np.concatenate(all_skipped)) if all_ids else {}
    return _materialized(ctx, ds, prod.snapshot_id, len(rows), cfg.engine, skips)


def _materialized(ctx: Context, ds: str, snapshot_id: str, written: int, engine: str,
                  skipped: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The daily batch's outcome, kept in the day's record (``materialize``) and logged; skips are warned."""
    result = {"ds": ds, "snapshot_id": snapshot_id, "users": written, "engine": engine, "skipped": skipped}
    for reason, what in skipped.items():
        log.warning("materialize_embeddings skipped %d user(s) of %s (%s), e.g. %s: their stored values stay",
                    what["count"], ds, reason, what["users"])
    ctx.day(ds).write("materialize", result)
    return result


def rollout(ds: str, snapshot_id: str | None = None) -> dict[str, Any]:
    """Moves the serving app to the production snapshot; rolls back to the previous one on failure."""
    ctx = context()
    prod = _production(ctx, snapshot_id, "roll out")
    previous = None
    if prod.parent_id and ctx.ws.snapshot_dir(prod.parent_id).exists():
        previous = (ctx.ws.snapshot_dir(prod.parent_id), prod.parent_id)
    ensure_ray(ctx.params)
    try:
        result = serve_rollout(ctx.params, ctx.ws.snapshot_dir(prod.snapshot_id), prod.snapshot_id,
                               previous=previous, frozen=frozen_snapshot(ctx))
    except RolloutError as err:  # rolled back (or not): recorded on the snapshot that failed to roll out
        ctx.registry.update_record(prod.snapshot_id, {"rollout": err.record})
        raise
    ctx.registry.update_record(prod.snapshot_id, {"rollout": result["record"]})
    return {"ds": ds, "snapshot_id": prod.snapshot_id, **(result or {})}


def verify_serving(ds: str, snapshot_id: str | None = None) -> dict[str, Any]:
    """Checks that the endpoint serves the registry's production snapshot (the one this run promoted) and
    answers a user."""
    import httpx

    ctx = context()
    prod = ctx.registry.production()
    if snapshot_id is not None and prod is not None and prod.snapshot_id != snapshot_id:
        raise RuntimeError(f"registry production is {prod.snapshot_id}, this run promoted {snapshot_id}")
    served = served_snapshot_id(ctx.params)
    if prod is None or served != prod.snapshot_id:
        raise RuntimeError(f"serving reports {served!r}, registry production is {prod.snapshot_id if prod else None!r}")
    user_id = int(read_partition(ctx.ws.users_dir(ds), columns=["user_id"])["user_id"].min())
    url = f"{base_url(ctx.params)}/users/{user_id}/embeddings"
    resp = httpx.get(url, headers=auth_headers(ctx.params), timeout=30)
    if resp.status_code != 200:
        raise RuntimeError(f"GET {url} -> {resp.status_code}: {resp.text[:300]}")
    body = resp.json()
    return {"ds": ds, "served_snapshot_id": served, "probe_user": user_id, "user_snapshot_id": body.get("snapshot_id")}
