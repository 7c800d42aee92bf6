"""The SUM mix tower (paper §3.3): K user embeddings + ad features -> one logit per task.

The mix tower sees *no* user feature other than the SUM user embeddings, so every user signal has to flow
through the user tower (§3.3). It is a single DHEN-flavoured layer (an ensemble of a dot-product
interaction over all tokens and an MLP over the ad tokens, with a residual linear branch and LayerNorm;
the user embeddings enter through their dot products) followed by one logit head per task.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor, nn

from sum_models.spec import FeatureSpec
from sum_models.user_tower import DenseArch, check_feature_names

__all__ = ["AdArch", "DotInteraction", "DHENLayer", "MixTower"]


class AdArch(nn.Module):
    """Ad-side features to tokens: one ``nn.Embedding`` per ad categorical feature, dense ones projected.

    Tables are keyed by feature name (state-dict key ``tables.<feature>.weight``).

    Args:
        cardinalities: Feature name -> cardinality, in spec order.
        num_dense: Number of dense ad features.
        embedding_dim: D (same as the user embeddings, so tokens can be dotted together).
    """

    def __init__(self, cardinalities: Dict[str, int], num_dense: int, embedding_dim: int) -> None:
        super().__init__()
        check_feature_names(list(cardinalities), "ad sparse")
        self.embedding_dim = embedding_dim
        self.tables = nn.ModuleDict({name: nn.Embedding(int(n), embedding_dim) for name, n in cardinalities.items()})
        for table in self.tables.values():
            assert isinstance(table, nn.Embedding)
            nn.init.normal_(table.weight, std=1.0 / math.sqrt(embedding_dim))
        self.dense_arch = DenseArch(num_dense, embedding_dim)

    def forward(self, ad_sparse: Tensor, ad_dense: Tensor) -> Tensor:
        """Tokenises the ad features.

        Args:
            ad_sparse: int64 ``[B, N_ad_sparse]``.
            ad_dense: float32 ``[B, N_ad_dense]``.

        Returns:
            float32 ``[B, N_ad_sparse + N_ad_dense, D]``.
        """
        tokens: List[Tensor] = []
        i = 0
        for table in self.tables.values():
            tokens.append(table(ad_sparse[:, i]))
            i += 1
        dense_tokens = self.dense_arch(ad_dense)
        if len(tokens) == 0:
            return dense_tokens
        return torch.cat([torch.stack(tokens, dim=1), dense_tokens], dim=1)


class DotInteraction(nn.Module):
    """Pairwise dot products between distinct tokens (DLRM / DHEN dot-product module).

    Args:
        num_tokens: N.
        embedding_dim: D; products are scaled by ``1/sqrt(D)``.
    """

    rows: Tensor
    cols: Tensor

    def __init__(self, num_tokens: int, embedding_dim: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_tokens, num_tokens, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.scale = 1.0 / math.sqrt(embedding_dim)
        self.num_pairs = int(rows.numel())

    def forward(self, tokens: Tensor) -> Tensor:
        """Computes the upper-triangular Gram matrix entries.

        Args:
            tokens: float32 ``[B, N, D]``.

        Returns:
            float32 ``[B, N * (N - 1) / 2]``.
        """
        gram = torch.bmm(tokens, tokens.transpose(1, 2)) * self.scale  # [B, N, N]
        return gram[:, self.rows, self.cols]


class DHENLayer(nn.Module):
    """One DHEN-style layer: an ensemble of interaction modules over the same tokens.

    ``out = LayerNorm(ReLU(MLP(Concat(flatten(X_ctx), Dot(X)))) + Linear(flatten(X_ctx)))`` where ``X`` is
    every token and ``X_ctx`` leaves out the first ``dot_only_tokens`` tokens.

    The mix tower passes the K user embeddings as dot-only tokens (DLRM-style: embeddings meet the rest of
    the model through their pairwise dot products). On the simulator this both lowers holdout NE and makes
    day-over-day embeddings more stable than also feeding them flattened to the MLP (6 warm-started days:
    click NE 0.86 vs 0.92, min mean cosine 0.83 vs 0.73), because the user tower has to encode users in a
    geometry the ads can be matched against instead of a code only the MLP reads.

    Args:
        num_tokens: N, all tokens.
        embedding_dim: D.
        hidden_dim: Output width H.
        dot_only_tokens: Leading tokens that reach the layer only through :class:`DotInteraction`.
    """

    def __init__(self, num_tokens: int, embedding_dim: int, hidden_dim: int, dot_only_tokens: int = 0) -> None:
        super().__init__()
        if not 0 <= dot_only_tokens <= num_tokens:
            raise ValueError(f"dot_only_tokens must be in [0, {num_tokens}], got {dot_only_tokens}")
        self.dot_only_tokens = dot_only_tokens
        self.dot = DotInteraction(num_tokens, embedding_dim)
        flat = (num_tokens - dot_only_tokens) * embedding_dim
        if flat + self.dot.num_pairs == 0:
            raise ValueError("the DHEN layer has no input: add ad features or use more than one embedding")
        self.mlp = nn.Sequential(nn.Linear(flat + self.dot.num_pairs, hidden_dim), nn.ReLU())
        self.residual = nn.Linear(flat, hidden_dim) if flat > 0 else None
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """Runs the ensemble.

        Args:
            tokens: float32 ``[B, N, D]`` (the dot-only tokens first).

        Returns:
            float32 ``[B, H]``.
        """
        context = tokens[:, self.dot_only_tokens :].flatten(1)  # [B, (N - dot_only) * D]
        mixed = self.mlp(torch.cat([context, self.dot(tokens)], dim=1))
        if self.residual is not None:
            mixed = mixed + self.residual(context)
        return self.norm(mixed)


class MixTower(nn.Module):
    """User embeddings + ad features -> one logit per task (paper §3.3).

    Args:
        spec: Input spec (ad features and labels are used; user features are not, by design).
        num_embeddings: K.
        embedding_dim: D.
        hidden_dim: Width of the DHEN layer and task heads.
    """

    def __init__(self, spec: FeatureSpec, num_embeddings: int, embedding_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        if not spec.labels:
            raise ValueError("the mix tower needs at least one task label")
        self.num_tasks = len(spec.labels)
        self.ad_arch = AdArch({k: int(n) for k, n in spec.ad_sparse.items()}, len(spec.ad_dense), embedding_dim)
        num_tokens = num_embeddings + len(spec.ad_sparse) + len(spec.ad_dense)
        self.dhen = DHENLayer(num_tokens, embedding_dim, hidden_dim, dot_only_tokens=num_embeddings)
        check_feature_names(list(spec.labels), "label")
        self.heads = nn.ModuleDict(
            {
                label: nn.Sequential(nn.Linear(hidden_dim, hidden_dim // 2), nn.ReLU(), nn.Linear(hidden_dim // 2, 1))
                for label in spec.labels
            }
        )

    @torch.no_grad()
    def init_task_priors(self, base_rates: Tensor) -> None:
        """Sets each head's output bias to the logit of its task's base rate ("prior" initialisation).

        A fresh model then starts at NE ~= 1 instead of spending its first steps learning the base rate
        (click ~5-10 %, conversion ~1-2 %), which matters with only a few dozen steps a day.

        Args:
            base_rates: float ``[T]`` positive rates, ``spec.labels`` order (clipped to [1e-4, 1 - 1e-4]).
        """
        rates = base_rates.detach().double().clamp(1e-4, 1.0 - 1e-4)
        if rates.shape != (len(self.heads),):
            raise ValueError(f"expected {len(self.heads)} base rates, got shape {tuple(rates.shape)}")
        for head, rate in zip(self.heads.values(), rates):
            assert isinstance(head, nn.Sequential)
            out = head[-1]
            assert isinstance(out, nn.Linear)
            out.bias.fill_(float(torch.log(rate / (1.0 - rate))))

    def forward(self, user_embeddings: Tensor, ad_sparse: Tensor, ad_dense: Tensor) -> Tensor:
        """Scores impressions.

        Args:
            user_embeddings: float32 ``[B, K, D]`` from the user tower.
            ad_sparse: int64 ``[B, N_ad_sparse]``.
            ad_dense: float32 ``[B, N_ad_dense]``.

        Returns:
            float32 logits ``[B, T]`` in ``spec.labels`` order.
        """
        tokens = torch.cat([user_embeddings, self.ad_arch(ad_sparse, ad_dense)], dim=1)  # [B, N, D]
        hidden = self.dhen(tokens)  # [B, H]
        logits: List[Tensor] = []
        for head in self.heads.values():  # one head per task, spec.labels order
            logits.append(head(hidden))
        return torch.cat(logits, dim=1)
