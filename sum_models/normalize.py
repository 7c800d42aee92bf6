"""Dense-input normalisation with statistics learnt at training time and stored in the snapshot.

For each dense feature ``i``, fitted on the training examples of the first day the feature is trained::

    z_i = clamp((x_i - mu_i) / sigma_i, -c, c)        mu_i, sigma_i: the feature's mean and standard deviation

Real data puts counts in the thousands next to rates in [0, 1]; without this the dense tokens
(``token_i = z_i w_i + b_i``, eq. 1's ``X_dense``) scale with the raw units, and one value orders of
magnitude off moves the embeddings as far as it likes. The clamp bounds what any single value can do.
The statistics are buffers keyed by feature name (``dense_norm.features.<name>.mean`` / ``.std`` /
``.fitted``), so they travel in the snapshot's weights, warm starting by name keeps them, and a feature
added later is fitted on its first day. A feature that was never fitted passes through unchanged (no
clamp either): a snapshot exported before normalisation existed computes what it always did.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["CLAMP", "FeatureStats", "DenseNormalizer"]

#: ``c``: a normalised value lies in ``[-c, c]`` (5 standard deviations).
CLAMP = 5.0
#: A feature whose standard deviation is below this is constant on its first day: scaled by 1.
MIN_STD = 1e-6


class FeatureStats(nn.Module):
    """One dense feature's training statistics: ``mean``, ``std`` and ``fitted`` (0 or 1), 0-d buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))
        self.register_buffer("fitted", torch.zeros(()))


class DenseNormalizer(nn.Module):
    """Standardises and clamps dense inputs with per-feature statistics learnt by :meth:`fit`.

    Args:
        names: Dense feature names, in spec order.
        clamp: ``c`` of the module docstring.

    Example::

        >>> norm = DenseNormalizer(["visits", "rate"])
        >>> x = torch.tensor([[1000.0, 0.1], [3000.0, 0.3]])
        >>> norm(x).equal(x)  # not fitted yet: unchanged
        True
        >>> norm.fit(x)
        ['visits', 'rate']
        >>> norm(x).round(decimals=4)
        tensor([[-1., -1.],
                [ 1.,  1.]])
        >>> norm(torch.tensor([[1e9, 0.2]]))  # far out of range: clamped
        tensor([[5., 0.]])
    """

    def __init__(self, names: Sequence[str], clamp: float = CLAMP) -> None:
        super().__init__()
        self.names = list(names)
        self.clamp = float(clamp)
        self.features = nn.ModuleDict({n: FeatureStats() for n in self.names})

    def _stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, std, fitted)``, each ``[N_dense_features]``."""
        features = list(self.features.values())
        return tuple(torch.stack([getattr(f, name) for f in features]) for name in ("mean", "std", "fitted"))

    def forward(self, dense: Tensor) -> Tensor:
        """Normalises dense inputs.

        Args:
            dense: float32 ``[B, N_dense_features]``, columns in ``names`` order.

        Returns:
            float32 ``[B, N_dense_features]``: fitted columns standardised and clamped to ``[-c, c]``, the
            others unchanged.
        """
        if len(self.names) == 0:
            return dense
        mean, std, fitted = self._stats()  # [N] each
        z = torch.clamp((dense - mean) / std, -self.clamp, self.clamp)  # [B, N]
        return torch.where(fitted > 0, z, dense)

    @torch.no_grad()
    def fit(self, dense: Tensor) -> list[str]:
        """Learns the statistics of every feature not fitted yet (a fitted one keeps its own).

        Args:
            dense: float32 ``[N, N_dense_features]`` training inputs (one row per example).

        Returns:
            The names of the features fitted now.
        """
        if dense.shape[0] == 0:
            return []
        values = dense.to(torch.float64)
        fitted_now = []
        for i, (name, stats) in enumerate(self.features.items()):
            assert isinstance(stats, FeatureStats)
            if stats.fitted.item() > 0:
                continue
            std = values[:, i].std(unbiased=False).item()
            stats.mean.fill_(values[:, i].mean().item())
            stats.std.fill_(std if std >= MIN_STD else 1.0)
            stats.fitted.fill_(1.0)
            fitted_now.append(name)
        return fitted_now
