"""Encoding of pandas frames into the model's input tensors.

Sparse id lists are encoded in the ``nn.EmbeddingBag`` format (one flat id tensor plus one offsets tensor per
feature), so variable-length lists never need padding. Encoding is vectorised through Arrow list arrays: no
Python loop over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from sum_models.spec import FeatureSpec

_FLOAT32_MAX = float(np.finfo(np.float32).max)

__all__ = [
    "UserInputs", "fill_missing_user_features", "encode_users", "encode_user_rows", "encode_examples",
    "encode_ad_features", "encode_labels", "finite_rows", "user_row_is_finite",
]


@dataclass
class UserInputs:
    """User-side model inputs for a batch of ``B`` rows.

    Attributes:
        dense: float32 ``[B, n_dense]``, dense user features in ``spec.user_dense`` order.
        sparse_ids: One int64 1-D tensor per sparse feature (``spec.user_sparse`` order): the ids of every
            row concatenated, already taken modulo the feature's hash size.
        sparse_offsets: One int64 ``[B]`` tensor per sparse feature: where each row's ids start in
            ``sparse_ids`` (``nn.EmbeddingBag`` offsets; an empty list is an empty bag).
    """

    dense: Tensor
    sparse_ids: list[Tensor]
    sparse_offsets: list[Tensor]

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def select(self, index: Tensor) -> "UserInputs":
        """Gathers rows (vectorised, no per-row loop).

        Args:
            index: int64 ``[B']`` row indices into this batch (any order, repeats allowed).

        Returns:
            The :class:`UserInputs` of those rows, in ``index`` order.
        """
        index = torch.as_tensor(index, dtype=torch.int64)
        ids_out: list[Tensor] = []
        offsets_out: list[Tensor] = []
        for ids, offsets in zip(self.sparse_ids, self.sparse_offsets):
            ends = torch.cat([offsets[1:], torch.tensor([ids.numel()], dtype=torch.int64)])
            lengths = (ends - offsets)[index]
            starts = offsets[index]
            new_offsets = torch.cumsum(lengths, 0) - lengths
            total = int(lengths.sum())
            # Position j of the output bag r reads ids[starts[r] + j].
            gather = torch.repeat_interleave(starts - new_offsets, lengths) + torch.arange(total)
            ids_out.append(ids[gather])
            offsets_out.append(new_offsets)
        return UserInputs(dense=self.dense[index], sparse_ids=ids_out, sparse_offsets=offsets_out)


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"frame is missing {what} column(s) {missing}; got {list(df.columns)}")


def _float_matrix(df: pd.DataFrame, columns: Sequence[str], what: str) -> Tensor:
    """Reads float columns into a float32 ``[N, len(columns)]`` tensor; rejects NaN/inf naming the column."""
    _require_columns(df, columns, what)
    if not columns:
        return torch.zeros((len(df), 0), dtype=torch.float32)
    try:
        values = df[list(columns)].to_numpy(dtype=np.float32, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} columns {list(columns)} are not numeric: {exc}") from exc
    finite = np.isfinite(values)
    if not finite.all():
        bad = [c for c, ok in zip(columns, finite.all(axis=0)) if not ok]
        raise ValueError(f"{what} column {bad[0]!r} has NaN/inf (or float32-overflowing) values (all bad: {bad})")
    return torch.from_numpy(np.ascontiguousarray(values))


def finite_rows(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """bool ``[N]``: rows whose ``columns`` are all finite as float32 (what the encoders accept).

    A value beyond float32's range (e.g. 1e39) is infinite to the model; a missing column counts as finite here
    (the encoders name it). The skip-and-count paths (serving, the daily batch, the gate) pick rows with this
    instead of letting one row's value fail a whole batch.
    """
    present = [c for c in columns if c in df.columns]
    if not present:
        return np.ones(len(df), dtype=bool)
    values = df[present].to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        return (np.abs(values) <= _FLOAT32_MAX).all(axis=1)  # NaN compares False


def user_row_is_finite(row: Mapping[str, Any], spec: FeatureSpec) -> bool:
    """Whether a feature row (:func:`encode_user_rows`) has finite float32 dense values (None: missing, fine)."""
    for name in spec.user_dense:
        value = row.get(name)
        if value is not None and not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
            return False
    return True


def _encode_id_lists(column: pd.Series, hash_size: int, name: str) -> tuple[Tensor, Tensor]:
    """Encodes a column of variable-length id lists into EmbeddingBag ``(ids, offsets)``.

    Missing lists (None/NaN) are empty bags; ids are taken modulo ``hash_size`` (negative ids too).
    """
    try:
        if isinstance(column.dtype, pd.ArrowDtype):
            arr = pa.array(column.array)
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            arr = arr.cast(pa.list_(pa.int64()))
        else:
            arr = pa.array(column.to_numpy(dtype=object), type=pa.list_(pa.int64()), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise ValueError(f"sparse column {name!r} must hold lists of integer ids: {exc}") from exc
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = arr.flatten()
    if flat.null_count:
        raise ValueError(f"sparse column {name!r} has null ids inside a list")
    ids = np.mod(flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), hash_size)
    offsets = np.cumsum(lengths) - lengths
    return torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(offsets)


def fill_missing_user_features(df: pd.DataFrame, spec: FeatureSpec) -> dict[str, int]:
    """Fills the user features a row lacks because they were declared after the row was written.

    Validation rejects nulls in every new partition, so a missing value in a joined or online row means
    the feature did not exist yet when that row was written (schema evolution). Such a value gets the
    input's neutral value: 0.0 for a dense feature, an empty bag for a sparse one. Rows with no user
    feature at all are the caller's to drop, not to fill.

    Args:
        df: Frame with every ``spec.user_dense`` and ``spec.user_sparse`` column; changed in place.
        spec: The model's input spec.

    Returns:
        ``{column: number of filled values}`` for the columns that had any.
    """
    filled: dict[str, int] = {}
    for name in spec.user_dense:
        missing = df[name].isna()
        if missing.any():
            filled[name] = int(missing.sum())
            df[name] = df[name].astype(np.float32).fillna(0.0)
    for name in spec.user_sparse:
        missing = df[name].isna()
        if missing.any():
            filled[name] = int(missing.sum())
            df[name] = [[] if m else v for v, m in zip(df[name].tolist(), missing.tolist())]
    return filled


def encode_users(df: pd.DataFrame, spec: FeatureSpec) -> UserInputs:
    """Encodes user features (the user tower's inputs).

    Args:
        df: One row per example or user, with every ``spec.user_dense`` column (float) and every
            ``spec.user_sparse`` column (list/array of int ids, may be empty). Other columns are ignored.
        spec: The model's input spec.

    Returns:
        :class:`UserInputs` with ``B = len(df)`` rows, in frame order.

    Raises:
        ValueError: A column is missing, a dense value is NaN/inf, or a sparse value is not an id list.
    """
    dense = _float_matrix(df, spec.user_dense, "user dense")
    _require_columns(df, list(spec.user_sparse), "user sparse")
    ids, offsets = [], []
    for name, hash_size in spec.user_sparse.items():
        i, o = _encode_id_lists(df[name], int(hash_size), name)
        ids.append(i)
        offsets.append(o)
    return UserInputs(dense=dense, sparse_ids=ids, sparse_offsets=offsets)


def encode_user_rows(rows: Sequence[Mapping[str, Any]], spec: FeatureSpec) -> UserInputs:
    """Encodes users' feature rows as read from the online store (serving: a few users, no frame).

    The same tensors as :func:`encode_users` on a frame of these rows after :func:`fill_missing_user_features`:
    a value that is None (declared after the row was written) is 0.0 (dense) or an empty bag (sparse); sparse
    ids are taken modulo the feature's hash size. Building a pandas frame costs more than the tower for one user.

    Args:
        rows: One mapping per user: every ``spec.user_dense`` name -> float (or None), every
            ``spec.user_sparse`` name -> a sequence of int ids (or None). Other keys are ignored.
        spec: The model's input spec.

    Returns:
        :class:`UserInputs` with ``B = len(rows)`` rows, in order.

    Raises:
        ValueError: A feature is absent from a row, a dense value is NaN/inf, or a sparse value is not an id list.

    Example::

        >>> spec = FeatureSpec(user_dense=("age",), user_sparse={"clicks": 10})
        >>> inputs = encode_user_rows([{"age": 0.5, "clicks": [3, 12]}, {"age": None, "clicks": None}], spec)
        >>> inputs.dense.tolist(), inputs.sparse_ids[0].tolist(), inputs.sparse_offsets[0].tolist()
        ([[0.5], [0.0]], [3, 2], [0, 2])
    """
    dense_names, sparse = list(spec.user_dense), spec.user_sparse
    for name in (*dense_names, *sparse):
        absent = sum(1 for r in rows if name not in r)
        if absent:
            raise ValueError(f"{absent} user row(s) lack feature {name!r}")
    dense = np.asarray([[0.0 if (v := r[c]) is None else v for c in dense_names] for r in rows], dtype=np.float32)
    dense = dense.reshape(len(rows), len(dense_names))
    finite = np.isfinite(dense)
    if not finite.all():
        bad = [c for c, ok in zip(dense_names, finite.all(axis=0)) if not ok]
        raise ValueError(f"user dense column {bad[0]!r} has NaN/inf (or float32-overflowing) values (all bad: {bad})")
    ids_out, offsets_out = [], []
    for name, hash_size in sparse.items():
        try:
            lists = [np.asarray([] if r[name] is None else r[name], dtype=np.int64).reshape(-1) for r in rows]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sparse column {name!r} must hold lists of integer ids: {exc}") from exc
        lengths = np.fromiter((x.size for x in lists), dtype=np.int64, count=len(lists))
        flat = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
        ids_out.append(torch.from_numpy(np.mod(flat, int(hash_size))))
        offsets_out.append(torch.from_numpy(np.cumsum(lengths) - lengths))
    return UserInputs(dense=torch.from_numpy(dense), sparse_ids=ids_out, sparse_offsets=offsets_out)


def encode_ad_features(df: pd.DataFrame, spec: FeatureSpec) -> tuple[Tensor, Tensor]:
    """Encodes the ad-side features (mix tower only).

    Args:
        df: Frame with every ``spec.ad_sparse`` column (int in ``[0, cardinality)``) and ``spec.ad_dense``
            column (float).
        spec: The model's input spec.

    Returns:
        ``(ad_sparse, ad_dense)``: int64 ``[B, n_ad_sparse]`` and float32 ``[B, n_ad_dense]``.

    Raises:
        ValueError: A column is missing, an id is out of range / not an integer, or a float is NaN/inf.
    """
    names = list(spec.ad_sparse)
    _require_columns(df, names, "ad sparse")
    cols = []
    for name, card in spec.ad_sparse.items():
        raw = df[name].to_numpy()
        if not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"ad sparse column {name!r} must be integer, got dtype {raw.dtype}")
        values = raw.astype(np.int64, copy=False)
        if values.size and (values.min() < 0 or values.max() >= card):
            raise ValueError(
                f"ad sparse column {name!r} has ids outside [0, {card}): min {values.min()}, max {values.max()}"
            )
        cols.append(values)
    ad_sparse = np.stack(cols, axis=1) if cols else np.zeros((len(df), 0), dtype=np.int64)
    ad_dense = _float_matrix(df, spec.ad_dense, "ad dense")
    return torch.from_numpy(np.ascontiguousarray(ad_sparse)), ad_dense


def encode_labels(df: pd.DataFrame, spec: FeatureSpec) -> Tensor:
    """Encodes the task labels.

    Args:
        df: Frame with every ``spec.labels`` column holding 0/1 (int or bool).
        spec: The model's input spec.

    Returns:
        float32 ``[B, T]`` in ``spec.labels`` order.

    Raises:
        ValueError: A label column is missing or holds anything other than 0/1.
    """
    labels = _float_matrix(df, spec.labels, "label")
    bad = (labels != 0) & (labels != 1)
    if bool(bad.any()):
        col = spec.labels[int(bad.any(dim=0).nonzero()[0, 0])]
        raise ValueError(f"label column {col!r} must be 0/1")
    return labels


def encode_examples(df: pd.DataFrame, spec: FeatureSpec) -> tuple[UserInputs, Tensor, Tensor, Tensor]:
    """Encodes impressions joined with user features (training / evaluation input).

    Args:
        df: Impressions with user features, ad features and labels (see the module docstring).
        spec: The model's input spec.

    Returns:
        ``(user_inputs, ad_sparse, ad_dense, labels)``: :class:`UserInputs` with ``B = len(df)``,
        int64 ``[B, n_ad_sparse]``, float32 ``[B, n_ad_dense]``, float32 ``[B, T]``.
    """
    users = encode_users(df, spec)
    ad_sparse, ad_dense = encode_ad_features(df, spec)
    return users, ad_sparse, ad_dense, encode_labels(df, spec)
