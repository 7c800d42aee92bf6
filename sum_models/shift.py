"""Embedding distribution shift (paper §5.2, §6.5 Table 3) and average pooling.

Both functions work on numpy arrays of user embeddings ``[N, K, D]`` (any float dtype, fp16 included) and
compute in float64.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["shift_metrics", "mean_norms", "average_pool", "shift_by_pooling_depth", "POOL_DEPTH"]

#: Versions averaged into a served embedding (paper 5.2: the current computed embedding and the two
#: most recent cached ones). Serving's stored slots, the feature view and the gate all derive from it.
POOL_DEPTH = 3

_TINY = 1e-12


def _check_3d(name: str, x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [N, K, D], got shape {arr.shape}")
    return arr


def shift_metrics(candidate: np.ndarray, production: np.ndarray) -> list[dict]:
    """Per-embedding shift between two snapshots' embeddings of the same users (Table 3).

    Args:
        candidate: ``[N, K, D]`` embeddings from the new snapshot.
        production: ``[N, K, D]`` embeddings of the same users, same order, from the current snapshot.

    Returns:
        One dict per embedding ``k``: ``{"embedding": k, "mean_cosine": mean_i cos(c_ik, p_ik),
        "relative_l2_change": mean_i |‖c_ik‖ - ‖p_ik‖| / ‖p_ik‖}``. Norms below 1e-12 are floored at
        1e-12 (a zero vector has cosine 0 with anything).

    Raises:
        ValueError: Shapes differ, are not 3-D, or there are no users.
    """
    c = _check_3d("candidate", candidate).astype(np.float64)
    p = _check_3d("production", production).astype(np.float64)
    if c.shape != p.shape:
        raise ValueError(f"candidate {c.shape} and production {p.shape} embeddings differ in shape")
    if c.shape[0] == 0:
        raise ValueError("shift metrics need at least one user")
    c_norm = np.linalg.norm(c, axis=2)  # [N, K]
    p_norm = np.linalg.norm(p, axis=2)
    cosine = (c * p).sum(axis=2) / np.maximum(c_norm * p_norm, _TINY)
    rel_l2 = np.abs(c_norm - p_norm) / np.maximum(p_norm, _TINY)
    return [
        {
            "embedding": k,
            "mean_cosine": float(cosine[:, k].mean()),
            "relative_l2_change": float(rel_l2[:, k].mean()),
        }
        for k in range(c.shape[1])
    ]


def mean_norms(embeddings: np.ndarray) -> list[float]:
    """The mean L2 norm of each embedding over users: ``[mean_i ||e_ik||_2 for k in range(K)]``.

    The scale a downstream model's input layer sees (audit study-acfeb1b §3: unbounded, it grew 800-3,000x in
    40 MovieLens days while the relative L2 change of Table 3 looked modest day to day). Non-finite rows are
    left out of the mean (NaN when every row is).

    Args:
        embeddings: ``[N, K, D]``, N >= 1.

    Returns:
        K floats.

    Raises:
        ValueError: Not 3-D, or no users.
    """
    e = _check_3d("embeddings", embeddings).astype(np.float64)
    if e.shape[0] == 0:
        raise ValueError("mean norms need at least one user")
    norms = np.linalg.norm(e, axis=2)  # [N, K]
    out = []
    for k in range(e.shape[1]):
        finite = norms[:, k][np.isfinite(norms[:, k])]
        out.append(float(finite.mean()) if finite.size else float("nan"))
    return out


def average_pool(versions: Sequence[np.ndarray]) -> np.ndarray:
    """Average pooling of the current and previous embedding versions (paper §5.2: current + 2 cached).

    Args:
        versions: Arrays of identical shape (e.g. ``[N, K, D]`` or ``[K, D]``), current first or last.

    Returns:
        The element-wise mean, computed in float64 and returned in the inputs' common dtype
        (fp16 in -> fp16 out).

    Raises:
        ValueError: No versions, or shapes differ.
    """
    if len(versions) == 0:
        raise ValueError("average_pool needs at least one embedding version")
    arrays = [np.asarray(v) for v in versions]
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise ValueError(f"embedding version {i} has shape {a.shape}, expected {shape}")
    dtype = np.result_type(*arrays)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    return np.mean(np.stack([a.astype(np.float64) for a in arrays]), axis=0).astype(dtype)


def shift_by_pooling_depth(versions: Sequence[np.ndarray], depths: Sequence[int] = (1, 2, 3, 4, 5)) -> list[dict]:
    """Table 3: the day-to-day shift of average-pooled embeddings, per pooling depth.

    With ``AP_k(t)`` the average of the versions of days ``t-k+1 .. t`` (:func:`average_pool`; ``k = 1``
    is the raw version, the paper's "None"), the shift at depth ``k`` is :func:`shift_metrics` of
    ``AP_k(t)`` against ``AP_k(t-1)``, averaged over every ``t`` whose two windows are full (``t >= k``).

    Args:
        versions: Daily ``[N, K, D]`` embeddings of the same users in the same order, oldest first.
        depths: Pooling depths ``k``; a depth needing more than ``len(versions) - 1`` earlier days is left out.

    Returns:
        One dict per (depth, embedding): ``pooling``, ``embedding``, ``cosine`` and ``l2_change`` (means
        over the compared days) and ``days`` (how many pairs were compared).

    Example::

        >>> day = np.ones((4, 2, 3))
        >>> rows = shift_by_pooling_depth([day, 2 * day, 3 * day], depths=(1, 2))
        >>> [(r["pooling"], r["embedding"], round(r["l2_change"], 3)) for r in rows]
        [(1, 0, 0.75), (1, 1, 0.75), (2, 0, 0.667), (2, 1, 0.667)]
    """
    arrays = [_check_3d(f"version {i}", v) for i, v in enumerate(versions)]
    out: list[dict] = []
    for k in depths:
        if k < 1:
            raise ValueError(f"pooling depth must be >= 1, got {k}")
        days = range(k, len(arrays))  # AP_k(t) and AP_k(t-1) both full
        if not days:
            continue
        per_day = [shift_metrics(average_pool(arrays[t - k + 1 : t + 1]), average_pool(arrays[t - k : t])) for t in days]
        for e in range(arrays[0].shape[1]):
            out.append({
                "pooling": k,
                "embedding": e,
                "cosine": float(np.mean([m[e]["mean_cosine"] for m in per_day])),
                "l2_change": float(np.mean([m[e]["relative_l2_change"] for m in per_day])),
                "days": len(per_day),
            })
    return out
