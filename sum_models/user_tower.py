"""The SUM user tower (paper §3.2): user features -> K user embeddings of dimension D.

TorchRec-style composition: the tower is ``SparseArch`` (embedding bags) + ``DenseArch`` (dense features
to tokens) + an interaction module mapping the tokens to ``[B, K, D]``. The walking skeleton uses
:class:`FlattenMLPInteraction`; the paper's pyramid of Interaction Modules (eq. 1) replaces it by
implementing the same ``forward(sparse_tokens, dense_tokens) -> [B, K, D]`` contract.

Every module here is ``torch.jit.script``-able.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor, nn

from sum_models.spec import FeatureSpec

__all__ = ["check_feature_names", "SparseArch", "DenseArch", "FlattenMLPInteraction", "UserTower"]

POOLING_MODES = ("mean", "sum", "max")


def check_feature_names(names: List[str], what: str) -> None:
    """Feature names become module names (state-dict keys): non-empty, no dots."""
    for name in names:
        if not name or "." in name:
            raise ValueError(f"{what} feature name {name!r} must be non-empty and contain no '.'")


class SparseArch(nn.Module):
    """One ``nn.EmbeddingBag`` per sparse id-list feature, pooled per feature.

    Tables are keyed by feature name (state-dict key ``bags.<feature>.weight``, as in TorchRec's
    EmbeddingBagCollection), so warm-starting by name and shape keeps every table whose feature
    survives when features are added or removed.

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


class DenseArch(nn.Module):
    """Projects each dense feature to its own D-dim token: ``token_i = x_i * w_i + b_i``.

    One linear map per feature, vectorised as a ``[N_dense, D]`` weight (these are the paper's
    ``X_dense`` raw dense embeddings of eq. 1).

    Args:
        num_features: N_dense.
        embedding_dim: D.
    """

    def __init__(self, num_features: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.randn(num_features, embedding_dim) / math.sqrt(embedding_dim))
        self.bias = nn.Parameter(torch.zeros(num_features, embedding_dim))

    def forward(self, dense: Tensor) -> Tensor:
        """Tokenises dense features.

        Args:
            dense: float32 ``[B, N_dense]``.

        Returns:
            float32 ``[B, N_dense, D]``.
        """
        return dense.unsqueeze(-1) * self.weight + self.bias


class FlattenMLPInteraction(nn.Module):
    """Skeleton interaction: flatten every token, MLP, reshape to K embeddings.

    ``[B, N_sparse + N_dense, D] -> flatten -> Linear -> ReLU -> Linear -> [B, K, D]``.

    Args:
        num_tokens: N_sparse + N_dense.
        embedding_dim: D.
        hidden_dim: Width of the hidden layer.
        num_embeddings: K, the number of output user embeddings.
    """

    def __init__(self, num_tokens: int, embedding_dim: int, hidden_dim: int, num_embeddings: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.mlp = nn.Sequential(
            nn.Linear(num_tokens * embedding_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, num_embeddings * embedding_dim),
        )

    def forward(self, sparse_tokens: Tensor, dense_tokens: Tensor) -> Tensor:
        """Mixes the tokens into K user embeddings.

        Args:
            sparse_tokens: float32 ``[B, N_sparse, D]``.
            dense_tokens: float32 ``[B, N_dense, D]``.

        Returns:
            float32 ``[B, K, D]``.
        """
        x = torch.cat([sparse_tokens, dense_tokens], dim=1).flatten(1)
        return self.mlp(x).view(-1, self.num_embeddings, self.embedding_dim)


class UserTower(nn.Module):
    """User features -> K SUM user embeddings of dimension D (paper §3.2, §5.3: K=2, D=96).

    Args:
        spec: Input spec; one embedding bag per ``spec.user_sparse`` entry, one token per
            ``spec.user_dense`` entry.
        num_embeddings: K.
        embedding_dim: D.
        hidden_dim: Hidden width of the interaction MLP.
        pooling: EmbeddingBag mode for variable-length id lists.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        num_embeddings: int = 2,
        embedding_dim: int = 96,
        hidden_dim: int = 256,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        num_tokens = len(spec.user_sparse) + len(spec.user_dense)
        if num_tokens == 0:
            raise ValueError("the user tower needs at least one user feature")
        self.spec = spec  # plain attribute (not scripted, not in the state dict)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_dense = len(spec.user_dense)
        self.sparse_arch = SparseArch({k: int(n) for k, n in spec.user_sparse.items()}, embedding_dim, pooling)
        self.dense_arch = DenseArch(self.num_dense, embedding_dim)
        self.interaction = FlattenMLPInteraction(num_tokens, embedding_dim, hidden_dim, num_embeddings)

    def forward(self, dense: Tensor, sparse_ids: List[Tensor], sparse_offsets: List[Tensor]) -> Tensor:
        """Computes the SUM user embeddings.

        Args:
            dense: float32 ``[B, N_dense]`` dense user features.
            sparse_ids: ``N_sparse`` int64 1-D tensors (EmbeddingBag ids, already modulo hash size).
            sparse_offsets: ``N_sparse`` int64 ``[B]`` EmbeddingBag offsets.

        Returns:
            float32 ``[B, K, D]``.
        """
        sparse_tokens = self.sparse_arch(sparse_ids, sparse_offsets, dense.shape[0])  # [B, N_sparse, D]
        dense_tokens = self.dense_arch(dense)  # [B, N_dense, D] (X_dense of eq. 1)
        return self.interaction(sparse_tokens, dense_tokens)  # [B, K, D]
