"""The SUM user tower (paper §3.2): user features -> K user embeddings of dimension D.

TorchRec-style composition::

    UserTower = SparseArch (one EmbeddingBag per sparse feature, pooled)      -> X_sparse [B, N_sparse, D]
              + DenseNormalizer (training statistics, clamped; normalize.py)   -> z        [B, N_dense_features]
              + DenseArch  (dense features projected to tokens)                -> X_dense  [B, N_dense, D]
              + InteractionPyramid (Interaction Modules, eq. 1; LC to K)       -> [B, K, D]
              + OutputBound (model.output_norm: none | layernorm | l2)         -> [B, K, D]

Both input arches are keyed by feature name (state-dict keys ``sparse_arch.bags.<feature>.weight`` and
``dense_arch.features.<feature>.weight``), so warm-starting by name and shape keeps every input layer whose
feature survives when a feature is added or removed.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from sum_models.interaction import InteractionPyramid
from sum_models.normalize import DenseNormalizer
from sum_models.output_bound import OutputBound
from sum_models.presets import resolve_architecture
from sum_models.spec import FeatureSpec

__all__ = ["check_feature_names", "SparseArch", "DenseTokenizer", "DenseArch", "UserTower"]

POOLING_MODES = ("mean", "sum", "max")


def check_feature_names(names: List[str], what: str) -> None:
    """Feature names become module names (state-dict keys): non-empty, no dots."""
    for name in names:
        if not name or "." in name:
            raise ValueError(f"{what} feature name {name!r} must be non-empty and contain no '.'")


class SparseArch(nn.Module):
    """One ``nn.EmbeddingBag`` per sparse id-list feature, pooled per feature (configurable pooling).

    Tables are keyed by feature name (as in TorchRec's EmbeddingBagCollection).

    Args:
        hash_sizes: Feature name -> table size, in spec order.
        embedding_dim: D.
        pooling: EmbeddingBag mode (``mean``, ``sum`` or ``max``).
    """

    def __init__(self, hash_sizes: Dict[str, int], embedding_dim: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"sparse pooling must be one of {POOLING_MODES}, got {pooling!r}")
        check_feature_names(list(hash_sizes), "sparse")
        self.num_features = len(hash_sizes)
        self.embedding_dim = embedding_dim
        self.bags = nn.ModuleDict(
            {name: nn.EmbeddingBag(int(n), embedding_dim, mode=pooling) for name, n in hash_sizes.items()}
        )
        for bag in self.bags.values():
            assert isinstance(bag, nn.EmbeddingBag)
            nn.init.normal_(bag.weight, std=1.0 / math.sqrt(embedding_dim))

    def forward(self, sparse_ids: List[Tensor], sparse_offsets: List[Tensor], batch_size: int) -> Tensor:
        """Looks up and pools every sparse feature (an empty bag pools to zeros).

        Args:
            sparse_ids: ``N_sparse`` int64 1-D tensors of concatenated ids, in spec order.
            sparse_offsets: ``N_sparse`` int64 ``[B]`` bag offsets.
            batch_size: B (needed when there are no sparse features).

        Returns:
            float32 ``[B, N_sparse, D]``.
        """
        if len(sparse_ids) != self.num_features or len(sparse_offsets) != self.num_features:
            raise ValueError("expected one ids and one offsets tensor per sparse feature")
        pooled: List[Tensor] = []
        i = 0
        for bag in self.bags.values():
            pooled.append(bag(sparse_ids[i], sparse_offsets[i]))
            i += 1
        if len(pooled) == 0:
            return torch.zeros([batch_size, 0, self.embedding_dim])
        return torch.stack(pooled, dim=1)


class DenseTokenizer(nn.Module):
    """One dense feature's projection to a D-dim token: ``token = x * weight + bias``.

    Args:
        embedding_dim: D.
    """

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_dim) / math.sqrt(embedding_dim))
        self.bias = nn.Parameter(torch.zeros(embedding_dim))

    def forward(self, x: Tensor) -> Tensor:
        """Projects one feature.

        Args:
            x: float32 ``[B]``.

        Returns:
            float32 ``[B, D]``.
        """
        return x.unsqueeze(-1) * self.weight + self.bias


class DenseArch(nn.Module):
    """Dense user features -> the raw dense tokens ``X_dense`` of eq. 1.

    ``num_tokens == 0`` (default): one token per feature, ``token_i = x_i w_i + b_i``, one
    :class:`DenseTokenizer` per feature keyed by name (adding a feature adds a projection and keeps the
    others). ``num_tokens = n > 0``: every dense feature projected together to ``n`` tokens by one linear
    layer (for many dense features, e.g. the paper's ~1,000; the layer restarts when a feature is added).

    Args:
        names: Dense feature names, in spec order.
        embedding_dim: D.
        num_tokens: 0 for one token per feature, else the number of tokens.
    """

    def __init__(self, names: Sequence[str], embedding_dim: int, num_tokens: int = 0) -> None:
        super().__init__()
        names = list(names)
        check_feature_names(names, "dense")
        self.num_features = len(names)
        self.embedding_dim = int(embedding_dim)
        self.grouped = num_tokens > 0 and self.num_features > 0
        self.num_tokens = int(num_tokens) if self.grouped else self.num_features
        self.features = nn.ModuleDict({} if self.grouped else {n: DenseTokenizer(embedding_dim) for n in names})
        self.projection = nn.Linear(self.num_features, self.num_tokens * self.embedding_dim) if self.grouped else nn.Identity()

    def forward(self, dense: Tensor) -> Tensor:
        """Tokenises dense features.

        Args:
            dense: float32 ``[B, N_dense_features]``.

        Returns:
            float32 ``[B, N_dense, D]`` (``N_dense`` = features, or ``num_tokens`` when grouped).
        """
        if self.grouped:
            return self.projection(dense).view(-1, self.num_tokens, self.embedding_dim)
        if self.num_features == 0:
            return torch.zeros([dense.shape[0], 0, self.embedding_dim])
        weights: List[Tensor] = []
        biases: List[Tensor] = []
        for tokenizer in self.features.values():
            assert isinstance(tokenizer, DenseTokenizer)
            weights.append(tokenizer.weight)
            biases.append(tokenizer.bias)
        # Vectorised form of DenseTokenizer.forward over every feature: [B, N, 1] * [N, D] + [N, D].
        return dense.unsqueeze(-1) * torch.stack(weights) + torch.stack(biases)


class UserTower(nn.Module):
    """User features -> K SUM user embeddings of dimension D (paper §3.2, §5.3: K=2, D=96).

    Args:
        spec: Input spec; one embedding bag per ``spec.user_sparse`` entry, dense tokens from
            ``spec.user_dense``.
        arch: A resolved architecture or a ``model`` config (see :func:`sum_models.presets.resolve_architecture`).
    """

    def __init__(self, spec: FeatureSpec, arch: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        arch = resolve_architecture(arch)
        d, k = int(arch["embedding_dim"]), int(arch["num_embeddings"])
        if len(spec.user_sparse) + len(spec.user_dense) == 0:
            raise ValueError("the user tower needs at least one user feature")
        self.spec = spec  # plain attributes (not in the state dict)
        self.arch = arch
        self.num_embeddings = k
        self.embedding_dim = d
        self.sparse_arch = SparseArch({n: int(h) for n, h in spec.user_sparse.items()}, d, str(arch["sparse_pooling"]))
        self.dense_norm = DenseNormalizer(spec.user_dense)  # fitted by training (sum_models.train)
        self.dense_arch = DenseArch(spec.user_dense, d, int(arch["dense_tokens"]))
        num_dense = self.dense_arch.num_tokens
        self.pyramid = InteractionPyramid(len(spec.user_sparse) + num_dense, num_dense, d, arch["user_tower"], k)
        # No parameters: the bound adds no state-dict key, so any snapshot warm-starts either way.
        self.output_bound = OutputBound(str(arch["output_norm"]), d, float(arch["output_scale"]))

    def forward(self, dense: Tensor, sparse_ids: List[Tensor], sparse_offsets: List[Tensor]) -> Tensor:
        """Computes the SUM user embeddings.

        Args:
            dense: float32 ``[B, N_dense_features]`` dense user features.
            sparse_ids: ``N_sparse`` int64 1-D tensors (EmbeddingBag ids, already modulo hash size).
            sparse_offsets: ``N_sparse`` int64 ``[B]`` EmbeddingBag offsets.

        Returns:
            float32 ``[B, K, D]``; with ``output_norm`` ``l2`` or ``layernorm`` each ``[D]`` embedding has norm
            ``output_scale * sqrt(D)`` (sum_models/output_bound.py).
        """
        x_sparse = self.sparse_arch(sparse_ids, sparse_offsets, dense.shape[0])  # [B, N_sparse, D]
        x_dense = self.dense_arch(self.dense_norm(dense))  # [B, N_dense, D] (X_dense of eq. 1)
        x0 = torch.cat([x_sparse, x_dense], dim=1)  # [B, N_0, D]
        # The mix tower trains on the bounded embeddings too: it sees exactly what serving hands downstream.
        return self.output_bound(self.pyramid(x0, x_dense))  # [B, K, D]
