"""Training loop (eq. 8 loss) and NE evaluation (eq. 9) of the SUM model on pandas frames.

Warm start is the caller's job: pass a model loaded with :func:`sum_models.snapshot.load_model` from the
production snapshot, or a fresh one from :func:`sum_models.model.build_model`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sum_models.data import encode_ad_features, encode_examples, encode_labels, encode_users
from sum_models.loss import MultiTaskBCELoss
from sum_models.metrics import NormalizedEntropy
from sum_models.model import SUMModel, check_spec
from sum_models.presets import config_dict
from sum_models.runtime import torch_threads
from sum_models.spec import FeatureSpec

__all__ = ["TrainStats", "train_model", "predict_proba", "ne_accumulator", "evaluate_ne", "make_optimizer"]

TRAIN_CONFIG_DEFAULTS: dict[str, Any] = {
    "batch_size": 512,
    "epochs": 2,
    "learning_rate": 2e-3,
    "weight_decay": 0.0,
    "task_weights": {"click": 1.0, "conversion": 0.5},
    "optimizer": "adam",
}


@dataclass(frozen=True)
class TrainStats:
    """Summary of one :func:`train_model` call.

    Attributes:
        examples: Training rows (one epoch).
        epochs: Epochs run.
        steps: Optimizer steps.
        final_loss: Mean eq. 8 loss over the last epoch (example-weighted).
        epoch_losses: Mean loss of every epoch.
        examples_per_second: Examples processed per second in the training loop.
        seconds: Wall time of the whole call (encoding included).
        fresh_model: The model had never been trained before this call (its head biases got the
            base-rate prior when ``prior_init``).
        normalized_features: Dense user features whose normalisation statistics this call learnt
            (:mod:`sum_models.normalize`; a warm-started model keeps those it has).
    """

    examples: int
    epochs: int
    steps: int
    final_loss: float
    epoch_losses: tuple[float, ...]
    examples_per_second: float
    seconds: float
    fresh_model: bool = False
    normalized_features: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the stats."""
        out = asdict(self)
        out["epoch_losses"] = list(self.epoch_losses)
        return out


def _train_config_dict(train_cfg: Any) -> dict[str, Any]:
    cfg = {**TRAIN_CONFIG_DEFAULTS, **config_dict(train_cfg, "train")}
    if int(cfg["batch_size"]) < 1 or int(cfg["epochs"]) < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {cfg['batch_size']}, {cfg['epochs']}")
    return cfg


def make_optimizer(model: torch.nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
    """Builds the optimizer named by ``train_cfg.optimizer`` (``adam``, the default, or ``adagrad``).

    Args:
        model: The model to optimize.
        train_cfg: ``params.train`` or an equivalent mapping.

    Returns:
        The optimizer.
    """
    cfg = _train_config_dict(train_cfg)
    name = str(cfg["optimizer"]).lower()
    lr, wd = float(cfg["learning_rate"]), float(cfg["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'adagrad'")


def train_model(
    model: torch.nn.Module,
    df_train: pd.DataFrame,
    spec: FeatureSpec,
    train_cfg: Any,
    seed: int,
    *,
    progress: bool | None = None,
    num_threads: int | None = 1,
    prior_init: bool = True,
) -> TrainStats:
    """Trains ``model`` in place on a frame of impressions (eq. 8 loss).

    Deterministic for a given seed, initial weights and data: shuffling uses a generator seeded with
    ``seed`` and the global torch RNG is seeded inside a forked RNG state (the caller's is untouched).

    A fresh model (``model.examples_seen == 0``) first gets its head biases set to the logits of the
    training base rates (see :meth:`MixTower.init_task_priors`); a warm-started one keeps its weights.

    Args:
        model: The model (fresh or warm-started); modified in place and left in eval mode.
        df_train: Impressions joined with user features, with labels (see :mod:`sum_models.data`).
        spec: Model input spec.
        train_cfg: ``params.train`` or a mapping with ``batch_size``, ``epochs``, ``learning_rate``,
            ``weight_decay``, ``task_weights`` and optionally ``optimizer`` (``adam`` | ``adagrad``).
        seed: Shuffling / RNG seed.
        progress: Show a tqdm bar (loss, examples/s); default: only when stderr is a terminal.
        num_threads: torch intra-op threads during training (restored afterwards); None keeps torch's.
        prior_init: Initialise a fresh model's head biases from the base rates.

    Returns:
        :class:`TrainStats`.

    Raises:
        ValueError: Empty frame, bad features / labels, or a non-finite loss.
        SpecMismatchError: ``spec`` is not the spec the model was built with.
    """
    start = time.perf_counter()
    cfg = _train_config_dict(train_cfg)
    check_spec(getattr(model, "spec", None), spec)
    if len(df_train) == 0:
        raise ValueError("cannot train on an empty frame")
    users, ad_sparse, ad_dense, labels = encode_examples(df_train, spec)
    n = len(users)
    batch_size, epochs = int(cfg["batch_size"]), int(cfg["epochs"])
    loss_fn = MultiTaskBCELoss(spec.labels, cfg["task_weights"])
    fresh = int(model.examples_seen) == 0
    # Dense-input statistics: learnt from the first day a feature is trained on, then kept (warm start).
    tower = getattr(model, "user_tower", None)  # a baseline has no user tower
    normalized = tower.dense_norm.fit(users.dense) if tower is not None else []
    if prior_init and fresh:
        model.init_task_priors(labels.mean(dim=0))
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(n / batch_size)
    show = sys.stderr.isatty() if progress is None else progress
    epoch_losses: list[float] = []
    steps = 0
    model.train()
    loop_start = time.perf_counter()
    with torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shuffler = torch.Generator().manual_seed(seed)
        bar = tqdm(total=epochs * steps_per_epoch, disable=not show, desc="train", unit="batch", leave=False)
        try:
            for _ in range(epochs):
                order = torch.randperm(n, generator=shuffler)
                total = 0.0
                for b in range(steps_per_epoch):
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    batch = users.select(idx)
                    logits = model(batch.dense, batch.sparse_ids, batch.sparse_offsets, ad_sparse[idx], ad_dense[idx])
                    loss = loss_fn(logits, labels[idx])  # eq. 8
                    value = loss.item()
                    if not math.isfinite(value):
                        raise ValueError(f"non-finite training loss {value} at step {steps}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    total += value * len(idx)
                    bar.update(1)
                    elapsed = time.perf_counter() - loop_start
                    bar.set_postfix(loss=f"{value:.4f}", ex_s=f"{steps * batch_size / max(elapsed, 1e-9):.0f}")
                epoch_losses.append(total / n)
        finally:
            bar.close()
    loop_seconds = time.perf_counter() - loop_start
    model.examples_seen += n * epochs
    model.eval()
    return TrainStats(
        examples=n,
        epochs=epochs,
        steps=steps,
        final_loss=epoch_losses[-1],
        epoch_losses=tuple(epoch_losses),
        examples_per_second=n * epochs / max(loop_seconds, 1e-9),
        seconds=time.perf_counter() - start,
        fresh_model=fresh,
        normalized_features=tuple(normalized),
    )


def predict_proba(
    model: SUMModel,
    df: pd.DataFrame,
    spec: FeatureSpec,
    batch_size: int = 4096,
    *,
    num_threads: int | None = 1,
) -> np.ndarray:
    """Predicted probabilities of every task.

    Args:
        model: The model (its train/eval mode is restored afterwards).
        df: Impressions joined with user features (labels not needed).
        spec: Model input spec.
        batch_size: Rows per forward pass.
        num_threads: torch intra-op threads (restored afterwards); None keeps torch's setting.

    Returns:
        float64 ``[N, T]`` in frame order, ``spec.labels`` column order.
    """
    check_spec(getattr(model, "spec", None), spec)
    users = encode_users(df, spec)
    ad_sparse, ad_dense = encode_ad_features(df, spec)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch_threads(num_threads), torch.inference_mode():
            for lo in range(0, len(users), batch_size):
                idx = torch.arange(lo, min(lo + batch_size, len(users)))
                batch = users.select(idx)
                logits = model(batch.dense, batch.sparse_ids, batch.sparse_offsets, ad_sparse[idx], ad_dense[idx])
                out.append(torch.sigmoid(logits.double()).numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, len(spec.labels)), dtype=np.float64)
    return np.concatenate(out, axis=0)


def ne_accumulator(model: SUMModel, df: pd.DataFrame, spec: FeatureSpec, batch_size: int = 4096) -> NormalizedEntropy:
    """NE accumulator of the model on a labelled frame (merge across days with ``.merge``).

    Args:
        model: The model.
        df: Labelled impressions joined with user features.
        spec: Model input spec.
        batch_size: Rows per forward pass.

    Returns:
        A :class:`NormalizedEntropy` over ``spec.labels``.
    """
    labels = encode_labels(df, spec)
    return NormalizedEntropy(spec.labels).update(predict_proba(model, df, spec, batch_size), labels.numpy())


def evaluate_ne(model: SUMModel, df: pd.DataFrame, spec: FeatureSpec, batch_size: int = 4096) -> dict[str, float]:
    """Normalized Entropy (eq. 9) of the model per task on a labelled frame.

    Args:
        model: The model.
        df: Labelled impressions joined with user features (e.g. the day's holdout).
        spec: Model input spec.
        batch_size: Rows per forward pass.

    Returns:
        label -> NE (lower is better; 1.0 = predicting the base rate).

    Raises:
        ValueError: A task has a single label class in ``df`` (NE undefined).
        SpecMismatchError: ``spec`` is not the model's spec (e.g. yesterday's model, today's features:
            pass ``model.spec`` instead, the frame still holds its columns).
    """
    return ne_accumulator(model, df, spec, batch_size).compute()
