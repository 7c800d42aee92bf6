"""Permutation feature importance of a downstream model (paper §6.1.2 "Feature Importance Ranking", Table 1 FI).

The importance of an input feature is how much worse the model predicts held-out rows when that feature
is made uninformative: its values are shuffled across the rows (every other input of each row kept), which
keeps the feature's distribution but cuts its link to the label::

    importance(g) = mean_r NE(rows with group g permuted by permutation r) - NE(rows)

Features are ranked by importance, rank 1 = the most important. Table 1 reports the rank of the SUM
embeddings among all features of each downstream model (1 on the Messenger inbox model, 2 on most CTR
models). A feature *group* is permuted as a whole: each dense column, each categorical column, each id list
(all its ids together) and each SUM embedding ``k`` (its D floats together, one feature as in the paper). The
``has_embedding`` indicator is a group of its own when some rows lack an embedding (when it is constant,
shuffling it changes nothing).
"""

from __future__ import annotations

from typing import Any, Callable, List

import numpy as np
import pandas as pd
import torch

from sum_models.downstream import DownstreamModel
from sum_models.downstream_train import DownstreamData, evaluate_downstream

__all__ = ["EMBEDDING_GROUP", "AVAILABLE_GROUP", "permutation_importance", "sum_embedding_rank"]

#: Name of SUM embedding ``k``'s group (``sum_embedding_0``, ``sum_embedding_1``, ...).
EMBEDDING_GROUP = "sum_embedding_{}"
#: Name of the ``has_embedding`` indicator's group.
AVAILABLE_GROUP = "sum_embedding_available"

_Permute = Callable[[DownstreamData, torch.Tensor], DownstreamData]


def _replace(data: DownstreamData, **fields: Any) -> DownstreamData:
    values = {f: getattr(data, f)
              for f in ("dense", "categorical", "sum_embeddings", "has_embedding", "labels", "lists")}
    values.update(fields)
    return DownstreamData(**values)


def _column(field: str, i: int) -> _Permute:
    def permute(data: DownstreamData, perm: torch.Tensor) -> DownstreamData:
        x = getattr(data, field).clone()
        x[:, i] = x[perm, i]
        return _replace(data, **{field: x})

    return permute


def _list(i: int) -> _Permute:
    def permute(data: DownstreamData, perm: torch.Tensor) -> DownstreamData:
        lists = list(data.lists)
        lists[i] = lists[i][perm]  # whole lists move between rows
        return _replace(data, lists=tuple(lists))

    return permute


def _groups(model: DownstreamModel, data: DownstreamData) -> List[tuple[str, str, _Permute]]:
    """``(feature, kind, permute)`` for every input group of ``model.spec``, in input order."""
    spec = model.spec
    groups = [(name, "dense", _column("dense", i)) for i, name in enumerate(spec.dense)]
    groups += [(name, "categorical", _column("categorical", i)) for i, name in enumerate(spec.sparse)]
    groups += [(name, "id_list", _list(i)) for i, name in enumerate(spec.lists)]
    if spec.uses_embeddings:
        for k in range(spec.num_embeddings):
            groups.append((EMBEDDING_GROUP.format(k), "sum_embedding", _column("sum_embeddings", k)))
        assert data.has_embedding is not None
        if bool((data.has_embedding != data.has_embedding[0]).any()):

            def permute_available(d: DownstreamData, perm: torch.Tensor) -> DownstreamData:
                assert d.has_embedding is not None
                return _replace(d, has_embedding=d.has_embedding[perm])

            groups.append((AVAILABLE_GROUP, "sum_embedding", permute_available))
    return groups


def permutation_importance(
    model: DownstreamModel,
    frame: pd.DataFrame | DownstreamData,
    embeddings: Any = None,
    *,
    repeats: int = 3,
    seed: int = 0,
) -> pd.DataFrame:
    """Ranks the model's input features by the NE increase their permutation causes on held-out rows.

    Each group's permutations come from ``numpy.random.default_rng([seed, group index, repeat])``, so a
    group's result does not depend on which other groups exist, and the ranking is reproducible.

    Args:
        model: A trained downstream model.
        frame: Held-out labelled impressions (or rows already encoded for ``model.spec``).
        embeddings: ``[N, K, D]`` SUM embeddings of the rows (NaN rows = missing); ignored without SUM.
        repeats: Permutations averaged per group.
        seed: Permutation seed.

    Returns:
        One row per feature group, most important first: ``feature``, ``kind`` (``dense`` |
        ``categorical`` | ``id_list`` | ``sum_embedding``), ``ne_increase`` (mean over repeats), ``ne_increase_std``
        (over repeats), ``rank`` (1 = most important; ties keep input order). ``attrs["base_ne"]`` holds the
        unpermuted NE.

    Raises:
        ValueError: ``repeats < 1``, or the rows have a single label class (NE undefined).

    Example::

        >>> from sum_models.downstream import DownstreamSpec
        >>> from sum_models.downstream_train import train_downstream
        >>> rng = np.random.default_rng(0)
        >>> frame = pd.DataFrame({"signal": rng.normal(size=400), "noise": rng.normal(size=400)})
        >>> frame["click"] = (frame["signal"] + 0.3 * rng.normal(size=400) > 0).astype(int)
        >>> spec = DownstreamSpec("toy", "click", dense=("noise", "signal"))
        >>> model, _ = train_downstream(spec, frame, epochs=5, batch_size=32, lr=0.05)
        >>> permutation_importance(model, frame)[["feature", "rank"]].to_dict("records")
        [{'feature': 'signal', 'rank': 1}, {'feature': 'noise', 'rank': 2}]
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    data = frame if isinstance(frame, DownstreamData) else DownstreamData.from_frame(model.spec, frame, embeddings)
    base = evaluate_downstream(model, data)
    n = len(data)
    rows = []
    for g, (feature, kind, permute) in enumerate(_groups(model, data)):
        increases = []
        for r in range(repeats):
            perm = torch.from_numpy(np.random.default_rng([seed, g, r]).permutation(n))
            increases.append(evaluate_downstream(model, permute(data, perm)) - base)
        rows.append((feature, kind, float(np.mean(increases)), float(np.std(increases)), g))
    table = pd.DataFrame(rows, columns=["feature", "kind", "ne_increase", "ne_increase_std", "order"])
    table = table.sort_values(["ne_increase", "order"], ascending=[False, True], kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    table = table.drop(columns="order")
    table.attrs["base_ne"] = base
    return table


def sum_embedding_rank(importance: pd.DataFrame) -> int | None:
    """Table 1's FI: the best rank of any SUM embedding among all features (None without SUM).

    Args:
        importance: A :func:`permutation_importance` table.

    Returns:
        The smallest ``rank`` of a ``sum_embedding_<k>`` group (the availability indicator is not an
        embedding), or None when the model does not consume SUM embeddings.
    """
    embeddings = importance[importance["feature"].str.fullmatch(EMBEDDING_GROUP.format(r"\d+"))]
    return None if embeddings.empty else int(embeddings["rank"].min())
