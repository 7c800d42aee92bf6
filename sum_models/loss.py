"""Weighted multi-task binary cross-entropy (paper eq. 8), computed from logits."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiTaskBCELoss", "task_weight_vector"]

log = logging.getLogger(__name__)


def task_weight_vector(labels: Sequence[str], task_weights: Mapping[str, float] | None) -> Tensor:
    """Orders the task weights ``w_t`` like the model's heads.

    Args:
        labels: Task names in head order (``spec.labels``).
        task_weights: ``params.train.task_weights`` (label -> weight). A label without a weight gets 1.0;
            weights for labels the model does not have are ignored (logged).

    Returns:
        float32 ``[T]``.

    Raises:
        ValueError: A weight is negative or all weights are zero.
    """
    task_weights = dict(task_weights or {})
    unknown = sorted(set(task_weights) - set(labels))
    if unknown:
        log.warning("task weights for unknown labels %s are ignored (labels: %s)", unknown, list(labels))
    weights = [float(task_weights.get(name, 1.0)) for name in labels]
    if any(w < 0 for w in weights):
        raise ValueError(f"task weights must be >= 0, got {dict(zip(labels, weights))}")
    if not any(w > 0 for w in weights):
        raise ValueError(f"at least one task weight must be > 0, got {dict(zip(labels, weights))}")
    return torch.tensor(weights, dtype=torch.float32)


class MultiTaskBCELoss(nn.Module):
    """``L = -1/N sum_i sum_t w_t (y_ti log y^_ti + (1 - y_ti) log(1 - y^_ti))`` (eq. 8).

    Uses ``binary_cross_entropy_with_logits`` (log-sum-exp stable) instead of ``log(sigmoid(.))``.

    Args:
        labels: Task names in head order.
        task_weights: label -> ``w_t`` (see :func:`task_weight_vector`).
    """

    weights: Tensor

    def __init__(self, labels: Sequence[str], task_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.labels = tuple(labels)
        self.register_buffer("weights", task_weight_vector(self.labels, task_weights))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Computes the weighted loss.

        Args:
            logits: float ``[B, T]``.
            targets: float ``[B, T]`` of 0/1.

        Returns:
            Scalar loss (mean over examples of the weighted sum over tasks).
        """
        if logits.shape != targets.shape or logits.dim() != 2 or logits.shape[1] != len(self.labels):
            raise ValueError(
                f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be [B, {len(self.labels)}]"
            )
        per_example = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
        return (per_example * self.weights).sum(dim=1).mean()  # eq. 8
