"""Baselines for the SUM model: logistic regression on the same raw features.

The baseline has the model's input signature (so :func:`sum_models.train.train_model`,
:func:`~sum_models.train.evaluate_ne` and the loss apply unchanged) and one logit per task::

    logit_t = b_t + w_dense_t . x_user_dense + sum_f mean_{id in bag f} w_f[id, t]
                  + w_ad_dense_t . x_ad_dense + sum_g w_g[ad_id_g, t]

i.e. a linear model over the dense features and the (mean-pooled) one-hot encodings of every sparse id.
It cannot model user x ad interactions, which is what the SUM embeddings are for.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from sum_models.spec import FeatureSpec
from sum_models.user_tower import check_feature_names

__all__ = ["LogisticRegression"]


class LogisticRegression(nn.Module):
    """Multi-task logistic regression on the raw user and ad features.

    Args:
        spec: Input spec (same as the SUM model's).
    """

    examples_seen: Tensor

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        check_feature_names(list(spec.user_sparse) + list(spec.ad_sparse), "sparse")
        t = len(spec.labels)
        self.spec = spec
        self.user_dense = nn.Linear(len(spec.user_dense), t, bias=True)
        self.user_sparse = nn.ModuleDict(
            {name: nn.EmbeddingBag(int(n), t, mode="mean") for name, n in spec.user_sparse.items()}
        )
        self.ad_dense = nn.Linear(len(spec.ad_dense), t, bias=False)
        self.ad_sparse = nn.ModuleDict({name: nn.Embedding(int(n), t) for name, n in spec.ad_sparse.items()})
        for table in [*self.user_sparse.values(), *self.ad_sparse.values()]:
            nn.init.zeros_(table.weight)
        nn.init.zeros_(self.user_dense.weight)
        nn.init.zeros_(self.ad_dense.weight)
        self.register_buffer("examples_seen", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def init_task_priors(self, base_rates: Tensor) -> None:
        """Sets the bias to the logit of each task's base rate (NE 1 before training).

        Args:
            base_rates: float ``[T]``.
        """
        rates = base_rates.detach().double().clamp(1e-4, 1.0 - 1e-4)
        self.user_dense.bias.copy_(torch.log(rates / (1.0 - rates)).float())

    def forward(
        self,
        dense: Tensor,
        sparse_ids: List[Tensor],
        sparse_offsets: List[Tensor],
        ad_sparse: Tensor,
        ad_dense: Tensor,
    ) -> Tensor:
        """Scores impressions.

        Args:
            dense: float32 ``[B, N_dense]``.
            sparse_ids: ``N_sparse`` int64 1-D EmbeddingBag ids.
            sparse_offsets: ``N_sparse`` int64 ``[B]`` offsets.
            ad_sparse: int64 ``[B, N_ad_sparse]``.
            ad_dense: float32 ``[B, N_ad_dense]``.

        Returns:
            float32 logits ``[B, T]``.
        """
        logits = self.user_dense(dense) + self.ad_dense(ad_dense)
        i = 0
        for bag in self.user_sparse.values():
            logits = logits + bag(sparse_ids[i], sparse_offsets[i])
            i += 1
        j = 0
        for table in self.ad_sparse.values():
            logits = logits + table(ad_sparse[:, j])
            j += 1
        return logits
