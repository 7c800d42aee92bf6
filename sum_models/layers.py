"""Small building blocks shared by the towers: an MLP and the token-axis linear compression (LC).

Token tensors are ``[B, N, D]`` throughout: ``B`` examples, ``N`` tokens (embeddings), ``D`` channels.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "LinearCompression", "token_linear"]


def token_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """A linear map along the token axis: ``out[b, m] = sum_n weight[m, n] x[b, n] (+ bias[m])``.

    Computed with ``einsum`` (one GEMM over ``B * D`` columns, output contiguous in ``[B, M, D]``), which is
    ~1.5x faster on CPU than transposing to put the tokens last and back (and keeps later adds contiguous).

    Args:
        x: float32 ``[B, N, D]``.
        weight: ``[M, N]``.
        bias: Optional ``[M]`` (broadcast over D).

    Returns:
        float32 ``[B, M, D]``.
    """
    out = torch.einsum("mn,bnd->bmd", weight, x)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return out


class MLP(nn.Module):
    """``Linear -> ReLU -> ... -> Linear``: hidden layers with ReLU, a linear output layer.

    Args:
        in_dim: Input width.
        hidden: Widths of the hidden layers (may be empty: a single linear layer).
        out_dim: Output width.
        final_activation: Apply ReLU to the output too.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, final_activation: bool = False) -> None:
        super().__init__()
        dims = [int(in_dim), *[int(h) for h in hidden], int(out_dim)]
        layers: List[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2 or final_activation:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the MLP.

        Args:
            x: float32 ``[B, in_dim]``.

        Returns:
            float32 ``[B, out_dim]``.
        """
        return self.net(x)


class LinearCompression(nn.Module):
    """LC of the paper (§3.2): ``M`` learned weighted sums of ``N`` tokens, ``LC(X) = W X``.

    ``W`` is ``[M, N]``; applied along the token axis of ``X [B, N, D]`` (one GEMM, no per-example loop).

    Args:
        num_in: N.
        num_out: M.
    """

    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        self.num_in, self.num_out = int(num_in), int(num_out)
        self.weight = nn.Parameter(torch.randn(self.num_out, self.num_in) / math.sqrt(max(self.num_in, 1)))

    def forward(self, x: Tensor) -> Tensor:
        """Compresses tokens.

        Args:
            x: float32 ``[B, N, D]``.

        Returns:
            float32 ``[B, M, D]``: ``out[b, m] = sum_n W[m, n] x[b, n]``.
        """
        return token_linear(x, self.weight)
