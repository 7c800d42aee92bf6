"""Downstream ranking models that consume the SUM user embeddings (paper §1 Figure 1, §5.3, §6.2 Table 1).

SUM's upstream user model produces ``K`` user embeddings of ``D`` floats per user; hundreds of downstream
ads ranking models read them as ordinary dense input features, next to their own (few) features. The
paper measures the value of the embeddings on each downstream model as the NE difference between the
model with and without them and as the feature-importance rank of the embeddings (Table 1). Its gains are
largest on small, low-complexity models (the Messenger inbox CTR model, NE -0.35 %, FI rank 1) and
smaller on conversion tasks the CTR user model was not trained for.

A downstream model here is::

    x = concat( z(dense),                          normalised + clamped (sum_models.normalize)
                E_f[id_f]        for each categorical f,  one embedding table per feature
                mean_i B_l[id_i mod n_l]  for each id list l, an EmbeddingBag per list (empty list: zeros)
                W_k e_k + b_k    for each SUM embedding k, a small projection per embedding (fp32 in)
                has_embedding )                    0/1: the user had no embedding (zeros are not a value)
    logit = MLP(x)                                 no hidden layer = logistic regression

With no hidden layer every term is linear in its input (an embedding table read by a linear layer is a
weight per id), so the model *is* a logistic regression over the dense values, the one-hot ids and the
embedding coordinates. :func:`downstream_specs` builds three models that differ the way the paper's do:
``click`` (a CTR model, ad features + a few user features, a moderate MLP), ``conversion`` (a bigger
model on the conversion label) and ``inbox`` (low complexity: logistic regression over a few features).

A production downstream model is constrained, not blind: it has a few hundred features of its own, user id
lists among them, where SUM's user model reads thousands (paper §3.1, §6.1.3). Which user features each
model gets (how many dense ones, which id lists) is the caller's choice (``user_features``), so a study can
vary it and read SUM's gain against how much user signal the model already sees.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from sum_models.layers import MLP
from sum_models.normalize import DenseNormalizer
from sum_models.user_tower import check_feature_names

__all__ = ["DownstreamSpec", "DownstreamModel", "DownstreamPreset", "PRESETS", "downstream_specs"]


@dataclass(frozen=True)
class DownstreamSpec:
    """Inputs and size of one downstream model.

    Attributes:
        name: Model name (``click``, ``conversion``, ``inbox``, ...); not part of the architecture.
        label: The 0/1 label column it predicts.
        dense: Dense feature columns (floats), in input order.
        sparse: Single-valued categorical columns -> cardinality (ids in ``[0, cardinality)``), in order.
        lists: Id-list columns (variable length) -> table size (ids are taken modulo it), in order; each is
            read through a mean-pooling ``EmbeddingBag`` of ``sparse_dim``.
        uses_embeddings: Whether the model consumes the SUM user embeddings.
        num_embeddings: K, SUM embeddings per user (paper §5.3: 2 in production).
        embedding_dim: D, floats per SUM embedding (96 in production).
        hidden: MLP hidden widths; empty = logistic regression.
        sparse_dim: Width of each categorical feature's embedding table.
        projection_dim: Width each SUM embedding is projected to before the MLP.
    """

    name: str
    label: str
    dense: tuple[str, ...] = ()
    sparse: Dict[str, int] = field(default_factory=dict)
    lists: Dict[str, int] = field(default_factory=dict)
    uses_embeddings: bool = False
    num_embeddings: int = 2
    embedding_dim: int = 96
    hidden: tuple[int, ...] = ()
    sparse_dim: int = 8
    projection_dim: int = 8

    def __post_init__(self) -> None:
        # Normalise containers so equal specs compare equal whatever sequence type the caller used.
        object.__setattr__(self, "dense", tuple(str(c) for c in self.dense))
        object.__setattr__(self, "sparse", {str(c): int(n) for c, n in dict(self.sparse).items()})
        object.__setattr__(self, "lists", {str(c): int(n) for c, n in dict(self.lists).items()})
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        columns = self.feature_columns
        check_feature_names(list(columns), "downstream")
        if len(set(columns)) != len(columns):
            raise ValueError(f"downstream model {self.name!r} lists a feature twice: {columns}")
        if self.label in columns:
            raise ValueError(f"downstream model {self.name!r} uses its label {self.label!r} as a feature")
        bad = {c: n for c, n in {**self.sparse, **self.lists}.items() if n < 1}
        if bad:
            raise ValueError(f"categorical cardinalities and list table sizes must be >= 1, got {bad}")
        if min(self.num_embeddings, self.embedding_dim, self.sparse_dim, self.projection_dim, *self.hidden) < 1:
            raise ValueError("num_embeddings, embedding_dim, sparse_dim, projection_dim and hidden widths must be >= 1")
        if not (self.dense or self.sparse or self.lists or self.uses_embeddings):
            raise ValueError(f"downstream model {self.name!r} has no input feature")

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """The frame columns the model reads (dense first, then categorical, then id lists)."""
        return (*self.dense, *self.sparse, *self.lists)

    def with_embeddings(self, enabled: bool = True) -> "DownstreamSpec":
        """The same model with (or without) the SUM embeddings: the two arms of Table 1's NE diff."""
        return dataclasses.replace(self, uses_embeddings=bool(enabled))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["dense"], out["hidden"] = list(self.dense), list(self.hidden)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "DownstreamSpec":
        """Inverse of :meth:`to_dict` (a dict saved before a field existed takes the field's default)."""
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


class DownstreamModel(nn.Module):
    """A downstream ranking model: own features (+ the SUM user embeddings) -> one logit.

    The ``has_embedding`` indicator is an input only when the model uses the SUM embeddings. A model
    built without them *rejects* embeddings passed to ``forward`` (it has no weights for them: passing
    them is a wiring mistake, not something to drop silently); :class:`sum_models.downstream_train.DownstreamData`
    is where a spec decides which inputs it reads, so both arms of a comparison take the same data.

    Args:
        spec: The model's inputs and sizes.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> spec = DownstreamSpec("ctr", "click", dense=("ad_price",), sparse={"ad_category": 4},
        ...                       uses_embeddings=True, num_embeddings=2, embedding_dim=3, hidden=(8,))
        >>> model = DownstreamModel(spec)
        >>> dense = torch.tensor([[1.5], [0.5]])
        >>> categorical = torch.tensor([[0], [3]])
        >>> model(dense, categorical, torch.zeros(2, 2, 3)).shape
        torch.Size([2])
        >>> with_list = DownstreamSpec("ctr", "click", dense=("ad_price",), lists={"liked_pages": 10})
        >>> pages = torch.tensor([[3, 7, 10], [10, 10, 10]])  # padded with the table size: row 1 is empty
        >>> DownstreamModel(with_list)(dense, torch.zeros(2, 0, dtype=torch.long), lists=[pages]).shape
        torch.Size([2])
        >>> model(dense, categorical)
        Traceback (most recent call last):
        ...
        ValueError: downstream model 'ctr' consumes SUM embeddings: pass sum_embeddings [B, 2, 3]
    """

    def __init__(self, spec: DownstreamSpec) -> None:
        super().__init__()
        self.spec = spec
        self.dense_norm = DenseNormalizer(spec.dense)
        self.tables = nn.ModuleDict({name: nn.Embedding(n, spec.sparse_dim) for name, n in spec.sparse.items()})
        for table in self.tables.values():
            assert isinstance(table, nn.Embedding)
            # N(0, 1/dim): an id's vector has about unit norm, like a normalised dense value.
            nn.init.normal_(table.weight, std=1.0 / math.sqrt(spec.sparse_dim))
        # One bag per id list; row ``n`` (the table size) is the padding id, left out of the mean.
        self.bags = nn.ModuleDict({
            name: nn.EmbeddingBag(n + 1, spec.sparse_dim, mode="mean", padding_idx=n) for name, n in spec.lists.items()
        })
        for bag in self.bags.values():
            assert isinstance(bag, nn.EmbeddingBag)
            with torch.no_grad():
                bag.weight[:-1].normal_(std=1.0 / math.sqrt(spec.sparse_dim))
        k = spec.num_embeddings if spec.uses_embeddings else 0
        self.sum_proj = nn.ModuleList([nn.Linear(spec.embedding_dim, spec.projection_dim) for _ in range(k)])
        width = (len(spec.dense) + (len(spec.sparse) + len(spec.lists)) * spec.sparse_dim + k * spec.projection_dim
                 + (1 if k else 0))
        self.mlp = MLP(width, spec.hidden, 1)

    @torch.no_grad()
    def init_prior(self, base_rate: float) -> None:
        """Sets the output bias to the logit of the label's base rate: a fresh model starts at NE ~= 1.

        Args:
            base_rate: Positive rate of the training label (clipped to ``[1e-4, 1 - 1e-4]``).
        """
        rate = min(max(float(base_rate), 1e-4), 1.0 - 1e-4)
        out = self.mlp.net[-1]
        assert isinstance(out, nn.Linear)
        out.bias.fill_(math.log(rate / (1.0 - rate)))

    def forward(
        self,
        dense: Tensor,
        categorical: Tensor,
        sum_embeddings: Optional[Tensor] = None,
        has_embedding: Optional[Tensor] = None,
        lists: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """Scores impressions.

        Args:
            dense: float32 ``[B, n_dense]``, columns in ``spec.dense`` order (raw values).
            categorical: int64 ``[B, n_cat]``, columns in ``spec.sparse`` order, ids in range.
            sum_embeddings: ``[B, K, D]`` SUM user embeddings (any float dtype: served as fp16, computed in
                fp32); required iff ``spec.uses_embeddings``. Rows without an embedding hold zeros.
            has_embedding: float ``[B]`` 0/1, whether the row's embedding exists; default all ones.
            lists: One int64 ``[B, L_l]`` per id list, ``spec.lists`` order: ids in ``[0, n_l)`` padded with
                ``n_l`` (the table size); required iff ``spec.lists``.

        Returns:
            float32 logits ``[B]``.

        Raises:
            ValueError: Embeddings missing for a model that uses them, given to one that does not, or of
                the wrong shape; id lists missing or of the wrong number.
        """
        spec = self.spec
        parts: List[Tensor] = [self.dense_norm(dense)]  # [B, n_dense]
        for i, table in enumerate(self.tables.values()):
            parts.append(table(categorical[:, i]))  # [B, sparse_dim]
        given = 0 if lists is None else len(lists)
        if given != len(spec.lists):
            raise ValueError(f"downstream model {spec.name!r} reads {len(spec.lists)} id list(s) {list(spec.lists)}, "
                             f"got {given}")
        for ids, bag in zip(lists or (), self.bags.values()):
            parts.append(bag(ids))  # [B, sparse_dim]; a row of padding only: zeros
        if spec.uses_embeddings:
            k, d = spec.num_embeddings, spec.embedding_dim
            if sum_embeddings is None:
                raise ValueError(
                    f"downstream model {spec.name!r} consumes SUM embeddings: pass sum_embeddings [B, {k}, {d}]"
                )
            if sum_embeddings.dim() != 3 or tuple(sum_embeddings.shape[1:]) != (k, d):
                raise ValueError(f"sum_embeddings must be [B, {k}, {d}], got {tuple(sum_embeddings.shape)}")
            emb = sum_embeddings.to(torch.float32)  # fp16 is a storage format (§5.3), not a compute one
            for j, proj in enumerate(self.sum_proj):
                parts.append(proj(emb[:, j]))  # [B, projection_dim]
            if has_embedding is None:
                has_embedding = torch.ones(emb.shape[0], dtype=torch.float32)
            parts.append(has_embedding.to(torch.float32).reshape(-1, 1))  # [B, 1]
        elif sum_embeddings is not None or has_embedding is not None:
            raise ValueError(f"downstream model {spec.name!r} was built without SUM embeddings but was given some")
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)  # [B]


@dataclass(frozen=True)
class DownstreamPreset:
    """How one kind of downstream model picks its features and size from the columns a dataset has.

    ``None`` limits take every column of that kind; a limit on categoricals keeps the lowest-cardinality
    ones (categories before ids: a small model cannot afford an id table).

    Attributes:
        label: The label it predicts.
        hidden: MLP hidden widths (empty = logistic regression).
        max_ad_dense: Ad dense columns used (the first ones), None = all.
        max_ad_sparse: Ad categorical columns used, None = all.
        max_user_dense: User dense columns used (the first ones), None = all; ``user_features`` of
            :func:`downstream_specs` overrides it.
        user_lists: User id-list columns used; ``user_features`` of :func:`downstream_specs` overrides it.
        sparse_dim: Categorical embedding width.
        projection_dim: Width of each projected SUM embedding.
    """

    label: str
    hidden: tuple[int, ...]
    max_ad_dense: Optional[int] = None
    max_ad_sparse: Optional[int] = None
    max_user_dense: Optional[int] = None
    user_lists: tuple[str, ...] = ()
    sparse_dim: int = 8
    projection_dim: int = 8


#: The three downstream models, shaped after Table 1's spread: a CTR model, a bigger conversion model and a
#: low-complexity Messenger-inbox-like logistic regression over two ad features (plus the user features it is given).
PRESETS: Dict[str, DownstreamPreset] = {
    "click": DownstreamPreset("click", hidden=(64, 32), max_user_dense=2),
    "conversion": DownstreamPreset(
        "conversion", hidden=(128, 64, 32), max_user_dense=4, sparse_dim=16, projection_dim=16
    ),
    "inbox": DownstreamPreset("click", hidden=(), max_ad_dense=1, max_ad_sparse=1, max_user_dense=0),
}


def _first(columns: Sequence[str], limit: Optional[int]) -> tuple[str, ...]:
    return tuple(columns) if limit is None else tuple(columns)[:limit]


def _smallest(cardinalities: Mapping[str, int], limit: Optional[int]) -> Dict[str, int]:
    if limit is None:
        return dict(cardinalities)
    keep = set(sorted(cardinalities, key=lambda c: (cardinalities[c], list(cardinalities).index(c)))[:limit])
    return {c: n for c, n in cardinalities.items() if c in keep}  # caller's order


def downstream_specs(
    ad_dense: Sequence[str],
    ad_sparse: Mapping[str, int],
    user_dense: Sequence[str] = (),
    labels: Sequence[str] = ("click", "conversion"),
    num_embeddings: int = 2,
    embedding_dim: int = 96,
    with_embeddings: bool = True,
    names: Sequence[str] = tuple(PRESETS),
    presets: Optional[Mapping[str, DownstreamPreset]] = None,
    user_lists: Optional[Mapping[str, int]] = None,
    user_features: Optional[Mapping[str, Mapping[str, Any]]] = None,
    list_table_size: int = 1024,
) -> Dict[str, DownstreamSpec]:
    """Builds the downstream models' specs from the columns a dataset has.

    Args:
        ad_dense: Dense ad columns (simulator: ``ad_quality``, ``ad_price``; MovieLens:
            ``ml_item_mean_rating``, ``ml_item_ratings_before``).
        ad_sparse: Ad categorical column -> cardinality (``ad_id``, ``ad_category``).
        user_dense: Dense user columns available to downstream models (they are allowed only a few).
        labels: Label columns the data has.
        num_embeddings: K of the SUM model whose embeddings are consumed.
        embedding_dim: D of that model.
        with_embeddings: Whether the models consume the SUM embeddings.
        names: Presets to build, in order.
        presets: Preset definitions (default :data:`PRESETS`).
        user_lists: User id-list columns available to downstream models -> their id space (hash size).
        user_features: Per model name, ``{"dense": n, "lists": [...]}``: its first ``n`` user dense columns
            and these id lists, in place of the preset's ``max_user_dense`` and ``user_lists``.
        list_table_size: Rows of a list's bag: ``min(id space, list_table_size)``, ids taken modulo it.

    Returns:
        name -> :class:`DownstreamSpec`, in ``names`` order.

    Raises:
        ValueError: An unknown preset name, a preset's label is not among ``labels``, a model asks for more
            user dense columns than there are or for an id list the data does not have.

    Example::

        >>> specs = downstream_specs(["ad_quality", "ad_price"], {"ad_id": 100, "ad_category": 8})
        >>> list(specs)
        ['click', 'conversion', 'inbox']
        >>> specs["inbox"].dense, specs["inbox"].sparse, specs["inbox"].hidden
        (('ad_quality',), {'ad_category': 8}, ())
        >>> click = downstream_specs(["ad_quality"], {"ad_category": 8}, ["u0", "u1", "u2"], names=["click"],
        ...                          user_lists={"clicked_ad_categories": 64, "liked_pages": 2000},
        ...                          user_features={"click": {"dense": 2, "lists": ["clicked_ad_categories"]}})["click"]
        >>> click.dense, click.lists
        (('ad_quality', 'u0', 'u1'), {'clicked_ad_categories': 64})
    """
    table = PRESETS if presets is None else presets
    out: Dict[str, DownstreamSpec] = {}
    for name in names:
        if name not in table:
            raise ValueError(f"unknown downstream preset {name!r}; known: {sorted(table)}")
        p = table[name]
        if p.label not in labels:
            raise ValueError(
                f"downstream preset {name!r} predicts {p.label!r}, which is not among the labels {list(labels)}"
            )
        chosen = (user_features or {}).get(name)
        n_dense = p.max_user_dense if chosen is None else int(chosen["dense"])
        list_names = p.user_lists if chosen is None else tuple(chosen["lists"])
        if chosen is not None and n_dense > len(user_dense):  # a preset's max_user_dense is an upper bound
            raise ValueError(f"downstream model {name!r} asks for {n_dense} user dense features; the data has "
                             f"{len(user_dense)}")
        available = dict(user_lists or {})
        unknown = [c for c in list_names if c not in available]
        if unknown:
            raise ValueError(f"downstream model {name!r} asks for id list(s) {unknown}; "
                             f"the data has {sorted(available)}")
        out[name] = DownstreamSpec(
            name=name,
            label=p.label,
            dense=_first(ad_dense, p.max_ad_dense) + _first(user_dense, n_dense),
            sparse=_smallest(ad_sparse, p.max_ad_sparse),
            lists={c: min(available[c], list_table_size) for c in list_names},
            uses_embeddings=with_embeddings,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            hidden=p.hidden,
            sparse_dim=p.sparse_dim,
            projection_dim=p.projection_dim,
        )
    return out
