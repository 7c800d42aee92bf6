"""The parallel feature extractors of an Interaction Module (paper §3.2).

Every extractor is its own ``nn.Module`` with the same contract::

    forward(x: [B, N, D], x_dense: [B, N_dense, D]) -> [B, T, D]

``x`` is the module input ``X_{n-1}`` (it already holds the dense tokens, see
:mod:`sum_models.interaction`), ``x_dense`` the raw dense tokens ``X_dense`` and ``T`` the extractor's
``tokens`` option. Extractors are built from a resolved config entry (see :mod:`sum_models.presets`) by
:func:`build_extractor`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sum_models.layers import MLP, LinearCompression, token_linear

__all__ = [
    "MLPExtractor",
    "DotCompressionAttention",
    "CrossLayer",
    "DCNExtractor",
    "MixerBlock",
    "MLPMixerExtractor",
    "build_extractor",
    "EXTRACTORS",
]


class MLPExtractor(nn.Module):
    """MLP extractor: general non-linear implicit interactions over every token.

    ``flatten(X) -> MLP -> [T, D]``.

    Args:
        num_tokens: N.
        num_dense: N_dense (unused: the dense tokens are part of ``X``).
        embedding_dim: D.
        tokens: T.
        hidden: Hidden layer widths.
    """

    def __init__(self, num_tokens: int, num_dense: int, embedding_dim: int, tokens: int, hidden: List[int]) -> None:
        super().__init__()
        self.tokens, self.embedding_dim = int(tokens), int(embedding_dim)
        self.mlp = MLP(num_tokens * embedding_dim, hidden, tokens * embedding_dim)

    def forward(self, x: Tensor, x_dense: Tensor) -> Tensor:
        """Runs the MLP.

        Args:
            x: float32 ``[B, N, D]``.
            x_dense: float32 ``[B, N_dense, D]`` (unused).

        Returns:
            float32 ``[B, T, D]``.
        """
        return self.mlp(x.flatten(1)).view(-1, self.tokens, self.embedding_dim)


class DotCompressionAttention(nn.Module):
    """Dot Compression with Attention (eqs. 2-4).

    ``Y = MLP(Concat(LC(X_dense), LC(X)))`` (eq. 2, ``Y [N, M]``: attention weights),
    ``Z = MLP'(Concat(LC'(X_dense), LC'(X)))`` (eq. 3, ``Z [D, M]``: residual branch),
    ``out = X (X^T Y + Z)`` (eq. 4, ``[N, M]``), where ``LC(X_dense) = FC(X_dense)`` is a fully connected
    layer without non-linearity on the flattened dense tokens and ``LC(X)`` are ``C`` learned weighted sums
    of the tokens.

    ``X X^T`` is the ``N x N`` pairwise dot-product matrix; by associativity ``X (X^T Y)`` never
    materialises it: ``X^T Y`` is ``[D, M]`` and the whole extractor costs ``O(N D M)``, not ``O(N^2 D)``.
    Column ``m`` of the output holds the dot products of every token with the attention-pooled token
    ``X^T Y[:, m] + Z[:, m]``; a linear map ``N -> D`` shared by the columns turns the ``M`` columns into
    ``M = T`` output tokens.

    Args:
        num_tokens: N.
        num_dense: N_dense (0: no FC branch).
        embedding_dim: D.
        tokens: M = T, the number of compressed dot-product columns (and output tokens).
        compressed_tokens: C, the number of weighted sums in LC(X).
        hidden: Hidden widths of MLP and MLP'.
        dense_width: Output width of FC(X_dense); 0 = ``C * D`` (as many values as LC(X)).
    """

    def __init__(
        self,
        num_tokens: int,
        num_dense: int,
        embedding_dim: int,
        tokens: int,
        compressed_tokens: int,
        hidden: List[int],
        dense_width: int = 0,
    ) -> None:
        super().__init__()
        n, d, m, c = int(num_tokens), int(embedding_dim), int(tokens), int(compressed_tokens)
        self.num_tokens, self.embedding_dim, self.tokens = n, d, m
        self.has_dense = num_dense > 0
        self.lc_y = LinearCompression(n, c)
        self.lc_z = LinearCompression(n, c)
        in_dim = c * d
        if self.has_dense:
            width = int(dense_width) or c * d
            self.fc_y = nn.Linear(num_dense * d, width, bias=False)  # LC(X_dense) = FC(X_dense)
            self.fc_z = nn.Linear(num_dense * d, width, bias=False)
            in_dim += width
        else:
            self.fc_y = nn.Identity()
            self.fc_z = nn.Identity()
        self.mlp_y = MLP(in_dim, hidden, n * m)  # eq. 2
        self.mlp_z = MLP(in_dim, hidden, d * m)  # eq. 3
        self.project = nn.Linear(n, d)  # each of the M columns [N] -> one token [D]

    def _compress(self, lc: LinearCompression, fc: nn.Module, x: Tensor, x_dense: Tensor) -> Tensor:
        parts = [lc(x).flatten(1)]  # LC(X): [B, C * D]
        if self.has_dense:
            parts.insert(0, fc(x_dense.flatten(1)))  # FC(X_dense): [B, dense_width]
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor, x_dense: Tensor) -> Tensor:
        """Computes eqs. 2-4.

        Args:
            x: float32 ``[B, N, D]``.
            x_dense: float32 ``[B, N_dense, D]``.

        Returns:
            float32 ``[B, M, D]``.
        """
        y = self.mlp_y(self._compress(self.lc_y, self.fc_y, x, x_dense)).view(-1, self.num_tokens, self.tokens)  # eq. 2
        z = self.mlp_z(self._compress(self.lc_z, self.fc_z, x, x_dense)).view(-1, self.embedding_dim, self.tokens)  # eq. 3
        pooled = torch.bmm(x.transpose(1, 2), y) + z  # X^T Y + Z: [B, D, M], no N x N matrix
        out = torch.bmm(x, pooled)  # eq. 4: X (X^T Y + Z), [B, N, M]
        return self.project(out.transpose(1, 2))  # [B, M, D]


class CrossLayer(nn.Module):
    """One DCN cross layer (eq. 5): ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``.

    Args:
        dim: Width F of ``x``.
        rank: 0 for a full ``[F, F]`` weight; ``r > 0`` for the low-rank ``W = U V^T`` (DCN-v2 / DCN-Mix),
            ``U, V`` of ``[F, r]``.
    """

    def __init__(self, dim: int, rank: int = 0) -> None:
        super().__init__()
        self.rank = int(rank)
        if self.rank > 0:
            self.down = nn.Linear(dim, self.rank, bias=False)  # V^T
            self.up = nn.Linear(self.rank, dim)  # U, b
        else:
            self.down = nn.Identity()
            self.up = nn.Linear(dim, dim)  # W, b

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        """Applies eq. 5.

        Args:
            x0: float32 ``[B, F]``, the cross network's input.
            x: float32 ``[B, F]``, the previous layer's output.

        Returns:
            float32 ``[B, F]``.
        """
        return x0 * self.up(self.down(x)) + x  # eq. 5


class DCNExtractor(nn.Module):
    """Deep Cross Net extractor: stacked cross layers (eq. 5) over the flattened tokens.

    ``x_0 = flatten(X) [N D]``, ``L`` cross layers, reshaped back to ``[N, D]`` and compressed to ``T`` tokens
    with an LC.

    Args:
        num_tokens: N.
        num_dense: N_dense (unused: the dense tokens are part of ``X``).
        embedding_dim: D.
        tokens: T.
        num_layers: L.
        rank: 0 = full-rank ``W_l``; ``r > 0`` = low rank ``U_l V_l^T``.
    """

    def __init__(
        self, num_tokens: int, num_dense: int, embedding_dim: int, tokens: int, num_layers: int, rank: int
    ) -> None:
        super().__init__()
        self.num_tokens, self.embedding_dim = int(num_tokens), int(embedding_dim)
        self.layers = nn.ModuleList([CrossLayer(num_tokens * embedding_dim, rank) for _ in range(num_layers)])
        self.compress = LinearCompression(num_tokens, tokens)

    def forward(self, x: Tensor, x_dense: Tensor) -> Tensor:
        """Runs the cross network.

        Args:
            x: float32 ``[B, N, D]``.
            x_dense: float32 ``[B, N_dense, D]`` (unused).

        Returns:
            float32 ``[B, T, D]``.
        """
        x0 = x.flatten(1)  # [B, N * D]
        h = x0
        for layer in self.layers:
            h = layer(x0, h)
        return self.compress(h.view(-1, self.num_tokens, self.embedding_dim))


class MixerBlock(nn.Module):
    """One MLP-Mixer block (eqs. 6-7) on tokens ``X [N, D]``.

    Token mixing (eq. 6, a depth-wise convolution over tokens, one channel at a time):
    ``Y = X + W_2 ReLU(W_1 LayerNorm(X))`` with ``W_1 [H_t, N]``, ``W_2 [N, H_t]`` acting on the token axis.
    Channel mixing (eq. 7, a 1x1 convolution): ``Z = Y + ReLU(LayerNorm(Y) W_3^T) W_4^T`` with
    ``W_3 [H_c, D]``, ``W_4 [D, H_c]`` acting on the channel axis. (The paper writes the block in the
    ``D x N`` layout of the MLP-Mixer paper, hence the transposes in its eq. 6; both linear maps carry a
    bias, as in MLP-Mixer.)

    Args:
        num_tokens: N.
        embedding_dim: D.
        token_hidden: H_t.
        channel_hidden: H_c.
    """

    def __init__(self, num_tokens: int, embedding_dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(embedding_dim)
        self.token_fc1 = nn.Linear(num_tokens, token_hidden)  # W_1
        self.token_fc2 = nn.Linear(token_hidden, num_tokens)  # W_2
        self.channel_norm = nn.LayerNorm(embedding_dim)
        self.channel_fc1 = nn.Linear(embedding_dim, channel_hidden)  # W_3
        self.channel_fc2 = nn.Linear(channel_hidden, embedding_dim)  # W_4

    def forward(self, x: Tensor) -> Tensor:
        """Applies eqs. 6 and 7.

        Args:
            x: float32 ``[B, N, D]``.

        Returns:
            float32 ``[B, N, D]``.
        """
        # Token mixing along the token axis, the same MLP for every channel (weights applied on the left,
        # so no transpose is materialised).
        h = F.relu(token_linear(self.token_norm(x), self.token_fc1.weight, self.token_fc1.bias))  # [B, H_t, D]
        y = x + token_linear(h, self.token_fc2.weight, self.token_fc2.bias)  # eq. 6, [B, N, D]
        z = y + self.channel_fc2(F.relu(self.channel_fc1(self.channel_norm(y))))  # eq. 7, [B, N, D]
        return z


class MLPMixerExtractor(nn.Module):
    """MLP-Mixer extractor: one :class:`MixerBlock`, then an LC from ``N`` to ``T`` tokens.

    Args:
        num_tokens: N.
        num_dense: N_dense (unused: the dense tokens are part of ``X``).
        embedding_dim: D.
        tokens: T.
        token_hidden: H_t of eq. 6.
        channel_hidden: H_c of eq. 7.
    """

    def __init__(
        self, num_tokens: int, num_dense: int, embedding_dim: int, tokens: int, token_hidden: int, channel_hidden: int
    ) -> None:
        super().__init__()
        self.block = MixerBlock(num_tokens, embedding_dim, token_hidden, channel_hidden)
        self.compress = LinearCompression(num_tokens, tokens)

    def forward(self, x: Tensor, x_dense: Tensor) -> Tensor:
        """Mixes tokens and channels, then compresses.

        Args:
            x: float32 ``[B, N, D]``.
            x_dense: float32 ``[B, N_dense, D]`` (unused).

        Returns:
            float32 ``[B, T, D]``.
        """
        return self.compress(self.block(x))


EXTRACTORS: Dict[str, Any] = {
    "mlp": MLPExtractor,
    "dot_compression": DotCompressionAttention,
    "dcn": DCNExtractor,
    "mixer": MLPMixerExtractor,
}


def build_extractor(cfg: Mapping[str, Any], num_tokens: int, num_dense: int, embedding_dim: int) -> nn.Module:
    """Builds one extractor from a resolved config entry.

    Args:
        cfg: ``{"type": ..., "tokens": T, ...options}`` (see :mod:`sum_models.presets`).
        num_tokens: N of the module input.
        num_dense: N_dense.
        embedding_dim: D.

    Returns:
        The extractor module; ``forward(x [B, N, D], x_dense [B, N_dense, D]) -> [B, T, D]``.
    """
    options = {k: v for k, v in cfg.items() if k != "type"}
    kind = str(cfg["type"])
    if kind not in EXTRACTORS:
        raise ValueError(f"unknown extractor type {kind!r}; expected one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[kind](num_tokens, num_dense, embedding_dim, **options)
