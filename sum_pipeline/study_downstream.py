"""The study's downstream: each model trained day by day on the window (warm start, the paper's recurring training)
with one arm's embeddings, and scored on each day before it trains on it (progressive NE)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from sum_models.metrics import normalized_entropy
from sum_pipeline.study_data import Day
from sum_platform.config import Params

Scored = dict[str, tuple[np.ndarray, np.ndarray]]  # ds -> (predictions, labels), in the day's frame order


def window_ne(scored: Scored, days: list[str], masks: dict[str, np.ndarray] | None = None) -> tuple[float | None, int]:
    """NE (eq. 9) over every impression of ``days`` pooled (a small day weighs by its impressions), optionally only
    the rows a per-day mask keeps; and how many impressions that is."""
    parts = []
    for ds in days:
        if ds not in scored:
            continue
        probs, labels = scored[ds]
        if masks is not None:
            keep = masks[ds]
            probs, labels = probs[keep], labels[keep]
        parts.append((probs, labels))
    n = int(sum(len(y) for _, y in parts))
    if not n:
        return None, 0
    probs, labels = np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])
    try:
        return float(normalized_entropy(probs, labels)), n
    except ValueError:  # one label class in the window: NE undefined
        return None, n


def encode_days(spec, days: list[Day]) -> list[Any]:
    """Days ``1 .. D-1`` encoded once for ``spec``'s model, labels included and no embeddings: every arm attaches
    its own (:meth:`~sum_models.downstream_train.DownstreamData.with_embeddings`) to the same rows."""
    from sum_models.downstream_train import DownstreamData

    return [DownstreamData.from_frame(spec.with_embeddings(False), day.frame) for day in days[1:]]


def run_arm(spec, days: list[Day], embeddings: list[np.ndarray] | None, params: Params, seed: int,
            importance: bool, encoded: list[Any] | None = None) -> tuple[Scored, Any]:
    """Trains a downstream model day by day on days ``1 .. D-1``, predicting each day before training on it.

    Args:
        encoded: :func:`encode_days` of ``spec`` and ``days`` (default: encoded here).

    Returns:
        ``(scored, importance)``: per downstream day but the first (nothing was trained before it) the
        predictions and labels, and the permutation importance on the last day (or None).
    """
    from sum_models.downstream_train import predict_downstream, train_downstream
    from sum_models.importance import permutation_importance

    cfg = params.study
    encoded = encoded if encoded is not None else encode_days(spec, days)
    model, scored, table = None, {}, None
    for i, day in enumerate(days[1:]):
        emb = None if embeddings is None else embeddings[i]
        data = encoded[i].with_embeddings(spec, emb)  # the day's rows: scored, then trained on
        if model is not None:
            scored[day.ds] = (predict_downstream(model, data), data.labels.numpy())
        if i == len(days) - 2:  # the last day: held out for the importance, not trained on
            if importance and model is not None:
                with contextlib.suppress(ValueError):
                    table = permutation_importance(model, data, repeats=cfg.importance_repeats, seed=seed)
            break
        model, _ = train_downstream(spec, data, epochs=params.downstream.epochs,
                                    batch_size=cfg.downstream_batch_size, lr=params.downstream.learning_rate,
                                    seed=seed * 1000 + i, init_from=model)
    return scored, table


def describe(spec) -> str:
    """What a downstream model reads, e.g. ``MLP 64-32; 6 dense (ad and user), 2 categorical, 1 id list``."""
    body = "logistic regression" if not spec.hidden else "MLP " + "-".join(str(h) for h in spec.hidden)
    lists = len(spec.lists)
    return (f"{body}; {len(spec.dense)} dense (ad and user), {len(spec.sparse)} categorical"
            + (f", {lists} id list{'s' if lists != 1 else ''}" if lists else ""))
