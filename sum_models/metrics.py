"""Normalized Entropy (paper eq. 9), mergeable across batches and days.

``NE = mean log loss / entropy of the background rate``: 1.0 is a constant predictor at the base rate,
lower is better. Accumulators are float64 sums, so merging partial results (batches, days, workers) is
exact up to float64 rounding and associative.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["NormalizedEntropy", "normalized_entropy", "DEFAULT_EPS"]

DEFAULT_EPS = 1e-7


def _as_2d_float64(x: Any, num_tasks: int, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1 and num_tasks == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != num_tasks:
        raise ValueError(f"{name} must be [N, {num_tasks}] (or [N] for one task), got shape {arr.shape}")
    return arr


class NormalizedEntropy:
    """Streaming NE per task.

    Args:
        tasks: Task names, in the column order of the arrays passed to :meth:`update`.
        eps: Predictions are clipped to ``[eps, 1 - eps]`` before taking logs.
    """

    def __init__(self, tasks: Sequence[str] = ("click",), eps: float = DEFAULT_EPS) -> None:
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError("NormalizedEntropy needs at least one task")
        self.eps = float(eps)
        t = len(self.tasks)
        self.log_loss_sum = np.zeros(t, dtype=np.float64)
        self.count = np.zeros(t, dtype=np.float64)
        self.positives = np.zeros(t, dtype=np.float64)

    def update(self, probs: Any, labels: Any) -> "NormalizedEntropy":
        """Adds a batch.

        Args:
            probs: Predicted probabilities ``[N, T]`` (or ``[N]`` for one task); numpy or torch.
            labels: 0/1 labels of the same shape.

        Returns:
            self (for chaining).

        Raises:
            ValueError: Shapes differ, a probability is NaN / outside [0, 1], or a label is not 0/1.
        """
        p = _as_2d_float64(probs, len(self.tasks), "probs")
        y = _as_2d_float64(labels, len(self.tasks), "labels")
        if p.shape != y.shape:
            raise ValueError(f"probs {p.shape} and labels {y.shape} differ in shape")
        if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
            raise ValueError("probs must be in [0, 1] (no NaN)")
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("labels must be 0/1")
        p = np.clip(p, self.eps, 1.0 - self.eps)
        self.log_loss_sum += -(y * np.log(p) + (1.0 - y) * np.log1p(-p)).sum(axis=0)
        self.count += y.shape[0]
        self.positives += y.sum(axis=0)
        return self

    def merge(self, other: "NormalizedEntropy") -> "NormalizedEntropy":
        """Combines two accumulators (associative and commutative); neither input is modified.

        Args:
            other: An accumulator over the same tasks.

        Returns:
            A new accumulator equal to having seen both inputs' data.
        """
        if other.tasks != self.tasks:
            raise ValueError(f"cannot merge NE over tasks {other.tasks} into {self.tasks}")
        out = NormalizedEntropy(self.tasks, self.eps)
        out.log_loss_sum = self.log_loss_sum + other.log_loss_sum
        out.count = self.count + other.count
        out.positives = self.positives + other.positives
        return out

    __add__ = merge

    def compute(self) -> dict[str, float]:
        """Evaluates eq. 9 per task.

        Returns:
            task -> NE.

        Raises:
            ValueError: A task has no examples, or only one label class (its background entropy is 0, so
                NE is undefined); the message names the task.
        """
        out, undefined = self.compute_defined()
        if undefined:
            name, why = next(iter(undefined.items()))
            raise ValueError(f"NE of task {name!r} is undefined: {why}")
        return out

    def evidence(self) -> dict[str, dict[str, int]]:
        """What each task's NE rests on: ``{task: {"holdout_rows": n, "positives": p}}`` (the gate needs enough of
        each label, ``gate.min_label_count``)."""
        return {name: {"holdout_rows": int(self.count[t]), "positives": int(self.positives[t])}
                for t, name in enumerate(self.tasks)}

    def compute_defined(self) -> tuple[dict[str, float], dict[str, str]]:
        """Evaluates eq. 9 for each task where it is defined.

        Returns:
            ``(ne, undefined)``: task -> NE for the tasks with both label classes, and task -> why for the
            others (no examples, or a single class: the background entropy is 0). A small day's holdout can
            lack the positives of a rare task; that task is then not measurable, which is not an error.
        """
        out: dict[str, float] = {}
        undefined: dict[str, str] = {}
        for t, name in enumerate(self.tasks):
            n, pos = self.count[t], self.positives[t]
            if n == 0:
                undefined[name] = "no examples"
                continue
            if pos == 0 or pos == n:
                kind = "positive" if pos == n else "negative"
                undefined[name] = f"all {int(n)} labels are {kind} (background entropy is 0)"
                continue
            rate = pos / n
            background = -(rate * np.log(rate) + (1.0 - rate) * np.log1p(-rate))  # denominator of eq. 9
            out[name] = float((self.log_loss_sum[t] / n) / background)  # eq. 9
        return out, undefined

    def __repr__(self) -> str:
        return f"NormalizedEntropy(tasks={self.tasks}, count={self.count.tolist()}, positives={self.positives.tolist()})"


def normalized_entropy(probs: Any, labels: Any, eps: float = DEFAULT_EPS, task: str = "task") -> float:
    """NE of a single task (eq. 9).

    Args:
        probs: Predicted probabilities ``[N]``.
        labels: 0/1 labels ``[N]``.
        eps: Clipping of probabilities to ``[eps, 1 - eps]``.
        task: Name used in error messages.

    Returns:
        The NE.

    Raises:
        ValueError: Empty input or a single label class.
    """
    p = np.asarray(probs.detach().cpu().numpy() if hasattr(probs, "detach") else probs, dtype=np.float64).ravel()
    y = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels, dtype=np.float64).ravel()
    return NormalizedEntropy((task,), eps).update(p, y).compute()[task]
