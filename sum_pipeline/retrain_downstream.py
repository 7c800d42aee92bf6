"""Retrains the downstream ranking models on a promoted day (the DAG ``sum_downstream``, paper §6).

Two steps, each rerun-safe for a date:

- :func:`training_frame`: the day's impressions with the downstream models' own user features and, per
  impression, the SUM embeddings serving would have returned at its time: Feast's point-in-time join over the
  logged writes of ``sum_embeddings`` (the daily batch and every SOAP write-back), never a value written later.
- :func:`retrain`: each model of ``downstream.models``, with and without the embeddings, is scored on the day
  (before training on it: the day is unseen, a progressive evaluation) and then trained on it, warm-started from
  its latest earlier day. Weights are saved with safetensors next to the spec and the day's metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sum_platform.context import context
from sum_platform.feature_store import get_store, historical_embeddings
from sum_platform.files import read_json, write_json, write_parquet
from sum_platform.partitions import read_partition
from sum_platform.sources import joined_day
from sum_platform.workspace import ds_str

log = logging.getLogger(__name__)

ARMS = ("with_sum", "without_sum")
WEIGHTS = "model.safetensors"


def training_frame(ds: str) -> dict[str, Any]:
    """Builds the day's training frame; returns its path, rows and embedding coverage."""
    ctx = context()
    params, ws = ctx.params, ctx.ws
    ev = params.events
    frame = joined_day(read_partition(ws.events_dir(ds)), read_partition(ws.users_dir(ds)), params)
    k = params.model.num_embeddings
    served = historical_embeddings(get_store(params), frame[[ev.user_id, ev.timestamp]], k, source="served",
                                   timestamp=ev.timestamp)
    for j in range(k):
        frame[f"embedding_{j}"] = served[f"embedding_{j}"].map(lambda v: None if v is None else np.asarray(v, np.float32))
    frame["embedding_snapshot_id"] = served["embedding_snapshot_id"]
    frame["embedding_written_at_ms"] = served["embedding_written_at_ms"]
    path = ws.downstream_frame(ds)
    write_parquet(frame, path)
    coverage = float(frame["embedding_0"].notna().mean()) if len(frame) else 0.0
    return {"ds": ds_str(ds), "frame": str(path), "rows": int(len(frame)), "coverage": round(coverage, 4)}


def embeddings_of(frame: pd.DataFrame, k: int, d: int) -> np.ndarray:
    """``[N, K, D]`` float32 from the frame's ``embedding_<k>`` columns (NaN rows: nothing was served)."""
    out = np.full((len(frame), k, d), np.nan, dtype=np.float32)
    for j in range(k):
        col = frame[f"embedding_{j}"]
        has = col.map(lambda v: v is not None and len(v) == d).to_numpy(dtype=bool)
        if has.any():
            out[has, j] = np.stack(col[has].to_numpy())
    out[~np.isfinite(out).all(axis=(1, 2))] = np.nan
    return out


def latest_before(root: Path, ds: str) -> Path | None:
    """The folder of the latest day before ``ds`` that saved weights under ``root`` (a model's arm), or None."""
    days = sorted(p for p in root.glob("ds=*") if p.name[3:] < ds and (p / WEIGHTS).is_file())
    return days[-1] if days else None


def load_downstream(folder: Path):
    """The downstream model saved in ``folder`` (its spec and safetensors weights), in eval mode."""
    from safetensors.torch import load_file  # torch: the task's process only

    from sum_models.downstream import DownstreamModel, DownstreamSpec

    model = DownstreamModel(DownstreamSpec.from_dict(read_json(folder / "spec.json")))
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model.eval()


def retrain(ds: str, frame_path: str | None = None) -> dict[str, Any]:
    """Scores, then retrains every downstream model with and without SUM on the day; returns their NE.

    Returns:
        ``{"ds", "models": {name: {"ne_with_sum", "ne_without_sum", "ne_diff_pct", "warm_start_from", ...}}}``;
        NE is None on a model's first day (nothing trained before) or when the day has one label class.
    """
    from safetensors.torch import save_file  # torch: the task's process only

    from sum_models.downstream_train import evaluate_downstream, train_downstream
    from sum_platform.downstream_inputs import downstream_specs_for

    ctx = context()
    params, ws = ctx.params, ctx.ws
    ds = ds_str(ds)
    frame = pd.read_parquet(frame_path or ws.downstream_frame(ds))
    k, d = params.model.num_embeddings, params.model.embedding_dim
    emb = embeddings_of(frame, k, d)
    specs = downstream_specs_for(params)  # each model's own user features (downstream.user_features)
    cfg = params.downstream
    out: dict[str, Any] = {}
    for name, base in specs.items():
        row: dict[str, Any] = {}
        for arm in ARMS:
            arm_spec = base.with_embeddings(arm == "with_sum")
            arm_emb = emb if arm == "with_sum" else None
            previous = latest_before(ws.root / "downstream" / name / arm, ds)
            model = load_downstream(previous) if previous else None
            ne = None
            # Dicts compare equal in any order; the model's tables follow the spec's order.
            if (model is not None and model.spec == arm_spec and list(model.spec.sparse) == list(arm_spec.sparse)
                    and list(model.spec.lists) == list(arm_spec.lists)):
                try:
                    ne = float(evaluate_downstream(model, frame, arm_emb))
                except ValueError as exc:  # a single label class that day
                    log.info("%s %s: NE not measured on %s: %s", name, arm, ds, exc)
            else:
                model = None  # a changed spec (new features) starts fresh
            seed = params.seed + int(pd.Timestamp(ds).toordinal())  # the same on every rerun of the day
            model, stats = train_downstream(arm_spec, frame, arm_emb, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                            lr=cfg.learning_rate, seed=seed, init_from=model)
            folder = ws.downstream_dir(name, arm, ds)
            folder.mkdir(parents=True, exist_ok=True)
            save_file({n: t.contiguous() for n, t in model.state_dict().items()}, folder / WEIGHTS)
            # Unsorted: the order of the categorical features is the order of the model's tables.
            write_json(folder / "spec.json", arm_spec.to_dict(), sort_keys=False)
            row[f"ne_{arm}"] = ne
            row[f"warm_start_{arm}"] = previous.name[3:] if previous else None
            row[f"train_examples_{arm}"] = stats.examples
        with_, without = row["ne_with_sum"], row["ne_without_sum"]
        row["ne_diff_pct"] = None if with_ is None or without is None else 100.0 * (with_ - without) / without
        row["embedding_coverage"] = float(np.isfinite(emb[:, 0, 0]).mean()) if len(emb) else 0.0
        for arm in ARMS:
            write_json(ws.downstream_dir(name, arm, ds) / "metrics.json", {"ds": ds, **row})
        out[name] = row
    return {"ds": ds, "models": out}
