"""Interaction Module (eq. 1) and the pyramid of Interaction Modules of the user tower (paper §3.2).

``X_n = Concat(Interaction(X_{n-1}), X_dense, Residual(X_{n-1}))`` (eq. 1), concatenated along the token
axis: ``Interaction`` runs the layer's extractors in parallel on ``X_{n-1}`` and concatenates their output
tokens, ``X_dense`` are the raw dense tokens of the embedding layer and ``Residual`` is a linear
compression (LC) of ``X_{n-1}`` to ``R`` tokens. The pyramid's input is
``X_0 = Concat(X_sparse, X_dense)``, so every ``X_n`` holds the raw dense tokens; an LC maps the last
module's tokens to the ``K`` output embeddings.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from sum_models.extractors import build_extractor
from sum_models.layers import LinearCompression

__all__ = ["InteractionModule", "InteractionPyramid"]


class InteractionModule(nn.Module):
    """One Interaction Module (eq. 1).

    Args:
        num_tokens: N_{n-1}, tokens of the input.
        num_dense: N_dense, raw dense tokens.
        embedding_dim: D.
        extractors: Resolved extractor configs (each with a ``tokens`` count ``T_e``).
        residual_tokens: R (0: no residual branch).
    """

    def __init__(
        self,
        num_tokens: int,
        num_dense: int,
        embedding_dim: int,
        extractors: Sequence[Mapping[str, Any]],
        residual_tokens: int,
    ) -> None:
        super().__init__()
        if not extractors:
            raise ValueError("an Interaction Module needs at least one extractor")
        self.extractors = nn.ModuleList(
            [build_extractor(cfg, num_tokens, num_dense, embedding_dim) for cfg in extractors]
        )
        self.has_residual = residual_tokens > 0
        self.residual = LinearCompression(num_tokens, residual_tokens) if self.has_residual else nn.Identity()
        self.num_out_tokens = sum(int(cfg["tokens"]) for cfg in extractors) + num_dense + residual_tokens

    def forward(self, x: Tensor, x_dense: Tensor) -> Tensor:
        """Computes ``X_n`` from ``X_{n-1}`` (eq. 1).

        Args:
            x: float32 ``[B, N_{n-1}, D]``.
            x_dense: float32 ``[B, N_dense, D]``.

        Returns:
            float32 ``[B, sum_e T_e + N_dense + R, D]``.
        """
        parts: List[Tensor] = []
        for extractor in self.extractors:  # Interaction(X_{n-1}): parallel extractors
            parts.append(extractor(x, x_dense))
        parts.append(x_dense)  # X_dense
        if self.has_residual:
            parts.append(self.residual(x))  # Residual(X_{n-1})
        return torch.cat(parts, dim=1)  # eq. 1


class InteractionPyramid(nn.Module):
    """Stacked Interaction Modules, then an LC to the ``K`` user embeddings.

    Args:
        num_tokens: N_0 = N_sparse + N_dense.
        num_dense: N_dense.
        embedding_dim: D.
        layers: Resolved layer configs (``{"residual_tokens", "extractors"}``), bottom first.
        num_embeddings: K.
    """

    def __init__(
        self,
        num_tokens: int,
        num_dense: int,
        embedding_dim: int,
        layers: Sequence[Mapping[str, Any]],
        num_embeddings: int,
    ) -> None:
        super().__init__()
        modules: List[InteractionModule] = []
        tokens = int(num_tokens)
        self.token_counts = [tokens]
        for layer in layers:
            module = InteractionModule(tokens, num_dense, embedding_dim, layer["extractors"], int(layer["residual_tokens"]))
            modules.append(module)
            tokens = module.num_out_tokens
            self.token_counts.append(tokens)
        self.blocks = nn.ModuleList(modules)
        self.output = LinearCompression(tokens, num_embeddings)

    def forward(self, x0: Tensor, x_dense: Tensor) -> Tensor:
        """Runs the pyramid.

        Args:
            x0: float32 ``[B, N_0, D]``, ``Concat(X_sparse, X_dense)``.
            x_dense: float32 ``[B, N_dense, D]``.

        Returns:
            float32 ``[B, K, D]``.
        """
        x = x0
        for module in self.blocks:
            x = module(x, x_dense)  # eq. 1
        return self.output(x)
