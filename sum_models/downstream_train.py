"""Training and NE evaluation of the downstream ranking models (paper §6.2: NE with vs without SUM).

A downstream model reads its own columns of an impression frame plus, when it consumes SUM, the user
embeddings of each row's user: a float array ``[N, K, D]`` aligned with the frame's rows (what joining
the embeddings served for each impression onto the frame gives). A row whose user had no embedding (a
new user, a failed lookup) is a row of NaN; it is encoded as zeros plus ``has_embedding = 0``, so a
missing embedding is an explicit input and never a real-looking zero vector.

Training is deterministic for a seed: the model is initialised and trained under ``torch.manual_seed``
inside a forked RNG state (the caller's is untouched) and batches are shuffled by a seeded generator.
The dense normaliser is fitted on the training frame the first time the model is trained; a warm start
(``init_from``: yesterday's model, the daily recurring retraining) keeps its statistics and weights.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from sum_models.downstream import DownstreamModel, DownstreamSpec
from sum_models.metrics import normalized_entropy
from sum_models.runtime import torch_threads

__all__ = [
    "DownstreamData",
    "DownstreamTrainStats",
    "train_downstream",
    "predict_downstream",
    "evaluate_downstream",
]


def _require(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame is missing {what} column(s) {missing}; got {list(frame.columns)}")


def _floats(frame: pd.DataFrame, columns: list[str], what: str) -> Tensor:
    """float32 ``[N, len(columns)]``; NaN/inf rejected naming the column (a wrong value must be loud)."""
    _require(frame, columns, what)
    try:
        values = frame[columns].to_numpy(dtype=np.float32, na_value=np.nan).reshape(len(frame), len(columns))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} columns {columns} are not numeric: {exc}") from exc
    ok = np.isfinite(values).all(axis=0)
    if not ok.all():
        raise ValueError(f"{what} column {columns[int(np.argmin(ok))]!r} has NaN/inf (or float32-overflowing) values")
    return torch.from_numpy(np.ascontiguousarray(values))


def _ids(frame: pd.DataFrame, cardinalities: dict[str, int]) -> Tensor:
    """int64 ``[N, len(cardinalities)]``; ids outside ``[0, cardinality)`` rejected."""
    _require(frame, list(cardinalities), "categorical")
    cols = []
    for name, card in cardinalities.items():
        raw = frame[name].to_numpy()
        if not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"categorical column {name!r} must be integer, got dtype {raw.dtype}")
        values = raw.astype(np.int64, copy=False)
        if values.size and (values.min() < 0 or values.max() >= card):
            raise ValueError(f"categorical column {name!r} has ids outside [0, {card}): {values.min()}..{values.max()}")
        cols.append(values)
    out = np.stack(cols, axis=1) if cols else np.zeros((len(frame), 0), dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(out))


def _id_lists(frame: pd.DataFrame, tables: dict[str, int]) -> tuple[Tensor, ...]:
    """One int64 ``[N, max length]`` per id-list column: ids modulo the table size ``n`` (hashing into a
    smaller table, as the user tower does), padded with ``n``; a missing list (None/NaN) is empty."""
    _require(frame, list(tables), "id list")
    out = []
    for name, size in tables.items():
        rows = [np.zeros(0, np.int64) if v is None or (np.ndim(v) == 0 and pd.isna(v)) else np.asarray(v)
                for v in frame[name].to_numpy()]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        if flat.size and not np.issubdtype(flat.dtype, np.integer):
            raise ValueError(f"id list column {name!r} must hold integer ids, got dtype {flat.dtype}")
        padded = np.full((len(rows), max(1, int(lengths.max(initial=0)))), size, dtype=np.int64)
        padded[np.arange(padded.shape[1]) < lengths[:, None]] = np.mod(flat.astype(np.int64), size)
        out.append(torch.from_numpy(padded))
    return tuple(out)


def _embeddings(embeddings: Any, n: int, spec: DownstreamSpec) -> tuple[Tensor, Tensor]:
    """``(float32 [N, K, D] with missing rows zeroed, float32 [N] has_embedding)``."""
    k, d = spec.num_embeddings, spec.embedding_dim
    if embeddings is None:
        raise ValueError(f"downstream model {spec.name!r} consumes SUM embeddings: pass an [N, {k}, {d}] array")
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().numpy()
    arr = np.asarray(embeddings)
    if arr.shape != (n, k, d):
        raise ValueError(f"embeddings must be [{n}, {k}, {d}] (one row per frame row), got {arr.shape}")
    arr = arr.astype(np.float32)  # fp16 storage -> fp32 compute
    nan = np.isnan(arr).reshape(n, -1)
    missing = nan.all(axis=1)
    if (nan.any(axis=1) & ~missing).any():
        row = int(np.argmax(nan.any(axis=1) & ~missing))
        raise ValueError(f"embedding row {row} is partly NaN: a missing embedding must be NaN throughout")
    arr[missing] = 0.0
    if not np.isfinite(arr).all():
        raise ValueError("embeddings hold inf (or float32-overflowing) values")
    return torch.from_numpy(np.ascontiguousarray(arr)), torch.from_numpy((~missing).astype(np.float32))


@dataclass
class DownstreamData:
    """A downstream model's inputs (and label) for ``N`` rows.

    Attributes:
        dense: float32 ``[N, n_dense]``, ``spec.dense`` order, raw values.
        categorical: int64 ``[N, n_cat]``, ``spec.sparse`` order.
        sum_embeddings: float32 ``[N, K, D]`` (zeros where missing), or None for a model without SUM.
        has_embedding: float32 ``[N]`` 0/1, or None for a model without SUM.
        labels: float32 ``[N]`` 0/1, or None when the frame was encoded without labels.
        lists: One int64 ``[N, L_l]`` per id list, ``spec.lists`` order, padded with the list's table size.

    Example::

        >>> spec = DownstreamSpec("ctr", "click", dense=("ad_price",), uses_embeddings=True,
        ...                       num_embeddings=1, embedding_dim=2)
        >>> frame = pd.DataFrame({"ad_price": [1.0, 2.0], "click": [0, 1]})
        >>> data = DownstreamData.from_frame(spec, frame, np.array([[[0.5, -1.0]], [[np.nan, np.nan]]]))
        >>> data.sum_embeddings.tolist(), data.has_embedding.tolist()
        ([[[0.5, -1.0]], [[0.0, 0.0]]], [1.0, 0.0])
    """

    dense: Tensor
    categorical: Tensor
    sum_embeddings: Optional[Tensor]
    has_embedding: Optional[Tensor]
    labels: Optional[Tensor]
    lists: tuple[Tensor, ...] = ()

    @classmethod
    def from_frame(
        cls, spec: DownstreamSpec, frame: pd.DataFrame, embeddings: Any = None, *, with_labels: bool = True
    ) -> "DownstreamData":
        """Encodes a frame (and the embeddings of its rows) for ``spec``.

        Embeddings given for a spec that does not use them are ignored: the spec decides which inputs
        it reads, so the with- and without-SUM arms of a comparison are called with the same data.

        Args:
            spec: The downstream model's spec.
            frame: Impressions with ``spec.feature_columns`` (and ``spec.label`` when ``with_labels``).
            embeddings: ``[N, K, D]`` float array (numpy or torch, fp16 allowed) aligned with the rows; a
                row of NaN = no embedding for that row. Required iff ``spec.uses_embeddings``.
            with_labels: Encode the label column too.

        Returns:
            The encoded rows, in frame order.

        Raises:
            ValueError: Missing columns, NaN/inf features, ids out of range, non-integer id lists, labels not
                0/1, embeddings of the wrong shape, partly NaN or missing for a model that needs them.
        """
        n = len(frame)
        dense = _floats(frame, list(spec.dense), "dense")
        categorical = _ids(frame, dict(spec.sparse))
        lists = _id_lists(frame, dict(spec.lists))
        sum_embeddings = has_embedding = None
        if spec.uses_embeddings:
            sum_embeddings, has_embedding = _embeddings(embeddings, n, spec)
        labels = None
        if with_labels:
            labels = _floats(frame, [spec.label], "label")[:, 0]
            if bool(((labels != 0) & (labels != 1)).any()):
                raise ValueError(f"label column {spec.label!r} must be 0/1")
        return cls(dense, categorical, sum_embeddings, has_embedding, labels, lists)

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def with_embeddings(self, spec: DownstreamSpec, embeddings: Any = None) -> "DownstreamData":
        """The same rows with ``spec``'s SUM inputs: ``embeddings`` encoded as :meth:`from_frame` does, or none
        for a spec without SUM. Encoding a frame once and attaching each arm's embeddings gives what
        ``from_frame(spec, frame, embeddings)`` gives (the study's arms share their day's frame)."""
        sum_embeddings = has_embedding = None
        if spec.uses_embeddings:
            sum_embeddings, has_embedding = _embeddings(embeddings, len(self), spec)
        return dataclasses.replace(self, sum_embeddings=sum_embeddings, has_embedding=has_embedding)

    def select(self, index: Tensor) -> "DownstreamData":
        """The rows ``index`` (int64 ``[B]``, any order, repeats allowed), in that order."""
        def pick(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[index]

        return DownstreamData(
            self.dense[index],
            self.categorical[index],
            pick(self.sum_embeddings),
            pick(self.has_embedding),
            pick(self.labels),
            tuple(ids[index] for ids in self.lists),
        )

    def rows(self, lo: int, hi: int) -> "DownstreamData":
        """The contiguous rows ``lo .. hi - 1`` as views (no copy): a batch of rows already in batch order."""
        def part(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[lo:hi]

        return DownstreamData(self.dense[lo:hi], self.categorical[lo:hi], part(self.sum_embeddings),
                              part(self.has_embedding), part(self.labels), tuple(ids[lo:hi] for ids in self.lists))

    def logits(self, model: DownstreamModel) -> Tensor:
        """``model``'s float32 logits ``[N]`` on these rows (one forward pass, gradients as the caller's mode)."""
        return model(self.dense, self.categorical, self.sum_embeddings, self.has_embedding, self.lists)


@dataclass(frozen=True)
class DownstreamTrainStats:
    """Summary of one :func:`train_downstream` call.

    Attributes:
        model: The spec's name.
        examples: Training rows (one epoch).
        epochs: Epochs run.
        steps: Optimizer steps.
        final_loss: Mean log loss of the last epoch.
        epoch_losses: Mean log loss of every epoch.
        seconds: Wall time (encoding included).
        warm_start: Started from ``init_from``'s weights.
        normalized_features: Dense features whose statistics this call learnt (a warm start keeps its own).
        embedding_coverage: Share of rows with a SUM embedding (None for a model without SUM).
    """

    model: str
    examples: int
    epochs: int
    steps: int
    final_loss: float
    epoch_losses: tuple[float, ...]
    seconds: float
    warm_start: bool
    normalized_features: tuple[str, ...]
    embedding_coverage: Optional[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the stats."""
        out = asdict(self)
        out["epoch_losses"] = list(self.epoch_losses)
        out["normalized_features"] = list(self.normalized_features)
        return out


def train_downstream(
    spec: DownstreamSpec,
    frame: pd.DataFrame | DownstreamData,
    embeddings: Any = None,
    *,
    epochs: int = 3,
    batch_size: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    init_from: Optional[DownstreamModel] = None,
    num_threads: Optional[int] = 1,
) -> tuple[DownstreamModel, DownstreamTrainStats]:
    """Trains a downstream model on a labelled frame (log loss, Adam).

    Args:
        spec: The model to train.
        frame: Labelled impressions (see :meth:`DownstreamData.from_frame`), or rows already encoded for
            ``spec`` (labels and, with SUM, embeddings included).
        embeddings: ``[N, K, D]`` SUM embeddings of the rows (NaN rows = missing), when ``frame`` is a frame;
            ignored without SUM.
        epochs: Passes over the frame.
        batch_size: Rows per step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        seed: Initialisation and shuffling seed: same seed, data and ``init_from`` -> identical weights.
        init_from: Yesterday's model to continue from (same spec up to its name); it is copied, not changed.
            A fresh model instead gets its output bias set to the base rate's logit.
        num_threads: torch intra-op threads during training (restored afterwards); None keeps torch's.

    Returns:
        ``(model, stats)``; the model is in eval mode.

    Raises:
        ValueError: Empty frame, bad inputs, an ``init_from`` of another architecture, a non-finite loss.

    Example::

        >>> spec = DownstreamSpec("inbox", "click", dense=("ad_quality",))
        >>> frame = pd.DataFrame({"ad_quality": [0.1, 0.9, 0.2, 0.8] * 8, "click": [0, 1, 0, 1] * 8})
        >>> model, stats = train_downstream(spec, frame, epochs=20, batch_size=8, lr=0.1, seed=0)
        >>> stats.steps, stats.normalized_features, evaluate_downstream(model, frame) < 0.1
        (80, ('ad_quality',), True)
    """
    start = time.perf_counter()
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if len(frame) == 0:
        raise ValueError("cannot train a downstream model on an empty frame")
    # Same architecture up to the name: load by position would silently mix up reordered features.
    if init_from is not None and dataclasses.replace(init_from.spec, name=spec.name) != spec:
        raise ValueError(f"cannot warm start {spec.name!r} from a model of another spec: {init_from.spec} vs {spec}")
    data = frame if isinstance(frame, DownstreamData) else DownstreamData.from_frame(spec, frame, embeddings)
    if data.labels is None:
        raise ValueError("cannot train a downstream model on rows encoded without labels")
    if spec.uses_embeddings != (data.sum_embeddings is not None):
        raise ValueError(f"rows encoded {'with' if data.sum_embeddings is not None else 'without'} SUM embeddings "
                         f"for {spec.name!r}, which {'reads' if spec.uses_embeddings else 'does not read'} them")
    n = len(data)
    loss_fn = nn.BCEWithLogitsLoss()
    with torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init_from is None:
            model = DownstreamModel(spec)
            model.init_prior(float(data.labels.mean()))
        else:
            model = copy.deepcopy(init_from)  # yesterday's model stays as it was
            model.spec = spec
        normalized = model.dense_norm.fit(data.dense)  # a warm start's features are fitted already
        # fused: one kernel for all parameters (same update rule; the per-tensor loop is ~4x slower per step)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        shuffler = torch.Generator().manual_seed(seed)
        steps, epoch_losses = 0, []
        model.train()
        for _ in range(epochs):
            # one gather per epoch, then contiguous views: the same batches as gathering each batch's rows
            shuffled = data.select(torch.randperm(n, generator=shuffler))
            total = 0.0
            for lo in range(0, n, batch_size):
                batch = shuffled.rows(lo, lo + batch_size)
                assert batch.labels is not None
                loss = loss_fn(batch.logits(model), batch.labels)
                value = loss.item()
                if not math.isfinite(value):
                    raise ValueError(f"non-finite training loss {value} at step {steps}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                total += value * len(batch)
            epoch_losses.append(total / n)
    model.eval()
    coverage = None if data.has_embedding is None else float(data.has_embedding.mean())
    return model, DownstreamTrainStats(
        model=spec.name,
        examples=n,
        epochs=epochs,
        steps=steps,
        final_loss=epoch_losses[-1],
        epoch_losses=tuple(epoch_losses),
        seconds=time.perf_counter() - start,
        warm_start=init_from is not None,
        normalized_features=tuple(normalized),
        embedding_coverage=coverage,
    )


@torch.no_grad()
def predict_downstream(
    model: DownstreamModel, data: DownstreamData, batch_size: int = 8192, *, num_threads: Optional[int] = 1
) -> np.ndarray:
    """Predicted probabilities.

    Args:
        model: The model (its train/eval mode is restored afterwards).
        data: Rows encoded for ``model.spec``.
        batch_size: Rows per forward pass.
        num_threads: torch intra-op threads (restored afterwards); None keeps torch's setting.

    Returns:
        float64 ``[N]`` in row order.
    """
    was_training = model.training
    model.eval()
    out = [np.zeros(0)]
    try:
        with torch_threads(num_threads):
            for lo in range(0, len(data), batch_size):
                batch = data.rows(lo, min(lo + batch_size, len(data)))
                out.append(torch.sigmoid(batch.logits(model).double()).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


def evaluate_downstream(model: DownstreamModel, frame: pd.DataFrame | DownstreamData, embeddings: Any = None) -> float:
    """Normalized Entropy (eq. 9, float64) of the model on labelled rows.

    Args:
        model: The model.
        frame: Labelled impressions (encoded with ``model.spec``), or rows already encoded for it.
        embeddings: ``[N, K, D]`` SUM embeddings of the rows, when ``frame`` is a frame; ignored without SUM.

    Returns:
        NE of ``model.spec.label`` (lower is better; 1.0 = predicting the base rate).

    Raises:
        ValueError: The rows hold a single label class (NE undefined), or no labels.
    """
    data = frame if isinstance(frame, DownstreamData) else DownstreamData.from_frame(model.spec, frame, embeddings)
    if data.labels is None:
        raise ValueError("evaluating a downstream model needs labelled rows")
    return normalized_entropy(predict_downstream(model, data), data.labels, task=model.spec.label)
