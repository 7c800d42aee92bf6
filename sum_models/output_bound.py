"""A bound on the scale of the K user embeddings the tower outputs (``model.output_norm``).

The paper does not normalise the tower's output; it measures the day-to-day change of the embeddings' norm
(§6.5, Table 3: 13 % / 5 % relative L2 change for a mature model) and names regularisation among the ways to
keep the shift a downstream model sees small (§5.2). A young tower trained daily on a few hundred rows
(MovieLens) has no such maturity: its embedding norms grew 800-3,000x in 40 days (audit study-acfeb1b §3),
a scale the downstream's linear projection, trained a few steps a day, cannot follow. Bounding the scale at
the output removes that degree of freedom from the served embedding; the direction still carries the user.

Modes, each applied to every embedding ``e_k`` (``[D]``) of every user on its own, with ``s = output_scale``:

* ``none``: ``e_k`` unchanged (the paper's tower).
* ``l2``: ``e_k <- s * sqrt(D) * e_k / ||e_k||_2``: every embedding has norm exactly ``s * sqrt(D)``, i.e. a
  root-mean-square coordinate of ``s``; only its direction is learnt.
* ``layernorm``: ``e_k <- s * (e_k - mean(e_k)) / sqrt(var(e_k) + eps)`` (LayerNorm, Ba et al. 2016, without
  the learnt gain and bias: a learnt gain could grow the scale back): norm ``s * sqrt(D)`` as well (up to
  eps), with the coordinates also centred.

``output_scale`` is the RMS coordinate rather than the norm so that it means the same for any D: ``1.0``
puts each coordinate on the scale of standardised features (what the downstream's other dense inputs are)
and of a LayerNorm's output. The bound has no parameters: switching it changes no state-dict key.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sum_models.presets import OUTPUT_NORMS

__all__ = ["OUTPUT_NORMS", "OutputBound"]

_EPS = 1e-12  # keeps a zero embedding finite (it maps to zero: no direction to scale); negligible above norms of 1e-5


class OutputBound(nn.Module):
    """Bounds each user embedding's scale (see the module docstring for the equations).

    Args:
        mode: ``none`` | ``layernorm`` | ``l2``.
        embedding_dim: D.
        scale: s, the root-mean-square coordinate of a bounded embedding (its norm is ``s * sqrt(D)``).
    """

    def __init__(self, mode: str, embedding_dim: int, scale: float) -> None:
        super().__init__()
        if mode not in OUTPUT_NORMS:
            raise ValueError(f"output_norm must be one of {OUTPUT_NORMS}, got {mode!r}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"output_scale must be a finite number > 0, got {scale!r}")
        self.mode = mode
        self.embedding_dim = int(embedding_dim)
        self.scale = float(scale)
        self.norm = self.scale * math.sqrt(self.embedding_dim)  # ||e_k|| under l2 (and layernorm, up to eps)

    def forward(self, embeddings: Tensor) -> Tensor:
        """Applies the bound.

        Args:
            embeddings: float32 ``[B, K, D]``.

        Returns:
            float32 ``[B, K, D]``: unchanged for ``none``; else each ``[D]`` vector of norm ``scale * sqrt(D)``.
        """
        if self.mode == "l2":
            return F.normalize(embeddings, p=2.0, dim=-1, eps=_EPS) * self.norm
        if self.mode == "layernorm":
            return F.layer_norm(embeddings, (self.embedding_dim,), eps=_EPS) * self.scale
        return embeddings

    def extra_repr(self) -> str:
        return f"mode={self.mode}, embedding_dim={self.embedding_dim}, scale={self.scale}"
