"""Training loop (eq. 8 loss) and NE evaluation (eq. 9) of the SUM model on pandas frames.

Warm start is the caller's job: pass a model loaded with :func:`sum_models.snapshot.load_model` from the
production snapshot, or a fresh one from :func:`sum_models.model.build_model`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

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

__all__ = ["TrainStats", "EncodedExamples", "train_model", "prepare_training", "run_epochs", "predict_proba", "ne_accumulator", "evaluate_ne", "make_optimizer"]

TRAIN_CONFIG_DEFAULTS: dict[str, Any] = {
    "batch_size": 512,
    "epochs": 2,
    "learning_rate": 2e-3,
    "weight_decay": 0.0,
    "task_weights": {"click": 1.0, "conversion": 0.5},
    "optimizer": "adam",
    # Data-parallel runs (sum_models/distributed.py); train_model itself is one process.
    "workers": 1,
    "cpus_per_worker": 0.5,
    "threads_per_worker": 1,
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
        # fused: one kernel for every parameter (torch's CPU fused Adam, same update rule); the per-tensor
        # loop costs ~4x more per step on these small models
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, fused=True)
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
    examples, fresh, normalized = prepare_training(model, df_train, spec, prior_init=prior_init)
    show = sys.stderr.isatty() if progress is None else progress
    with torch_threads(num_threads):
        epoch_losses, steps, loop_seconds = run_epochs(model, examples, spec, cfg, seed, progress=show)
    n = len(examples.labels)
    return TrainStats(
        examples=n,
        epochs=int(cfg["epochs"]),
        steps=steps,
        final_loss=epoch_losses[-1],
        epoch_losses=tuple(epoch_losses),
        examples_per_second=n * int(cfg["epochs"]) / max(loop_seconds, 1e-9),
        seconds=time.perf_counter() - start,
        fresh_model=fresh,
        normalized_features=tuple(normalized),
    )


@dataclass
class EncodedExamples:
    """A training frame encoded once (:func:`sum_models.data.encode_examples`): ``N`` rows.

    Attributes:
        users: User-side inputs of every row.
        ad_sparse: int64 ``[N, n_ad_sparse]``.
        ad_dense: float32 ``[N, n_ad_dense]``.
        labels: float32 ``[N, T]``.
    """

    users: Any
    ad_sparse: torch.Tensor
    ad_dense: torch.Tensor
    labels: torch.Tensor


def prepare_training(
    model: torch.nn.Module, df_train: pd.DataFrame, spec: FeatureSpec, *, prior_init: bool = True
) -> tuple[EncodedExamples, bool, list[str]]:
    """Encodes the frame and readies the model for its first step (done once, before any worker starts).

    A fresh model (``model.examples_seen == 0``) gets its head biases set to the logits of the training
    base rates (see :meth:`MixTower.init_task_priors`); dense-input statistics are learnt from the first day
    a feature is trained on, then kept (warm start).

    Returns:
        ``(examples, fresh, normalized_features)``.

    Raises:
        ValueError: Empty frame, bad features / labels.
        SpecMismatchError: ``spec`` is not the spec the model was built with.
    """
    check_spec(getattr(model, "spec", None), spec)
    if len(df_train) == 0:
        raise ValueError("cannot train on an empty frame")
    users, ad_sparse, ad_dense, labels = encode_examples(df_train, spec)
    fresh = int(model.examples_seen) == 0
    tower = getattr(model, "user_tower", None)  # a baseline has no user tower
    normalized = tower.dense_norm.fit(users.dense) if tower is not None else []
    if prior_init and fresh:
        model.init_task_priors(labels.mean(dim=0))
    return EncodedExamples(users, ad_sparse, ad_dense, labels), fresh, list(normalized)


def run_epochs(
    model: torch.nn.Module,
    examples: EncodedExamples,
    spec: FeatureSpec,
    train_cfg: Any,
    seed: int,
    *,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[float], int, float]:
    """The optimizer loop over ``epochs`` of the examples (eq. 8 loss); the model is left in eval mode.

    Deterministic for a given seed, initial weights and data: every process draws the same permutation from
    a generator seeded with ``seed`` and the global torch RNG is seeded inside a forked RNG state (the
    caller's is untouched). With ``world_size`` W > 1 (data-parallel training, ``model`` wrapped in DDP)
    each global batch of ``batch_size`` rows is split into W contiguous parts and this process trains on part
    ``rank``: DDP's gradient average over the W parts is the gradient of the whole batch (for equal parts).

    Args:
        model: The model (or its DDP wrapper); trained in place.
        examples: :func:`prepare_training`'s encoded frame (every process holds the whole of it).
        spec: Model input spec (the loss's task order).
        train_cfg: ``params.train`` or an equivalent mapping.
        seed: Shuffling / RNG seed.
        progress: Show a tqdm bar (loss, examples/s).
        rank: This process's part of each global batch.
        world_size: Processes training together.
        all_reduce: Sums a tensor over the processes (DDP: ``torch.distributed.all_reduce``); the loss of
            each step is summed so that every process sees the same value and stops on the same step.

    Returns:
        ``(epoch_losses, steps, loop_seconds)``: the example-weighted mean loss of every epoch over all
        processes.

    Raises:
        ValueError: A non-finite loss (raised by every process at the same step).
    """
    cfg = _train_config_dict(train_cfg)
    users, ad_sparse, ad_dense, labels = examples.users, examples.ad_sparse, examples.ad_dense, examples.labels
    n = len(labels)
    batch_size, epochs = int(cfg["batch_size"]), int(cfg["epochs"])
    loss_fn = MultiTaskBCELoss(spec.labels, cfg["task_weights"])
    optimizer = make_optimizer(getattr(model, "module", model), cfg)
    # A last batch with fewer rows than processes is dropped (a process may not train on an empty part).
    steps_per_epoch = n // batch_size + int(n % batch_size >= world_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training rows cannot be split over {world_size} processes")
    epoch_losses: list[float] = []
    steps = 0
    model.train()
    loop_start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shuffler = torch.Generator().manual_seed(seed)
        bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="train", unit="batch", leave=False)
        try:
            for _ in range(epochs):
                order = torch.randperm(n, generator=shuffler)
                total, rows = 0.0, 0
                for b in range(steps_per_epoch):
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    if world_size > 1:
                        idx = torch.tensor_split(idx, world_size)[rank]
                    batch = users.select(idx)
                    logits = model(batch.dense, batch.sparse_ids, batch.sparse_offsets, ad_sparse[idx], ad_dense[idx])
                    loss = loss_fn(logits, labels[idx])  # eq. 8
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    # Every process sees the same summed loss: they stop together on a non-finite one.
                    if all_reduce is None:
                        value, count = loss.item(), len(idx)
                    else:
                        part = all_reduce(torch.stack([loss.detach().double() * len(idx),
                                                       torch.tensor(float(len(idx)), dtype=torch.float64)]))
                        value, count = float(part[0]) / float(part[1]), int(part[1])
                    if not math.isfinite(value):
                        raise ValueError(f"non-finite training loss {value} at step {steps}")
                    optimizer.step()
                    steps += 1
                    total += value * count
                    rows += count
                    bar.update(1)
                    elapsed = time.perf_counter() - loop_start
                    bar.set_postfix(loss=f"{value:.4f}", ex_s=f"{rows / max(elapsed, 1e-9):.0f}")
                epoch_losses.append(total / rows)
        finally:
            bar.close()
    loop_seconds = time.perf_counter() - loop_start
    inner = getattr(model, "module", model)
    inner.examples_seen += n * epochs
    model.eval()
    return epoch_losses, steps, loop_seconds


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
