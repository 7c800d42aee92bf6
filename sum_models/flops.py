"""FLOP and parameter counting of the SUM towers (paper §6.1.3 reports 390M inference FLOPs per user for
the production user tower and 20M for a compact one).

FLOPs are those of ``torch.utils.flop_counter.FlopCounterMode``: matrix products (``mm``, ``addmm``,
``bmm``, ...) at 2 FLOPs per multiply-add. Embedding-bag lookups, element-wise ops and LayerNorm are
memory-bound and not counted (as is customary for model-FLOP utilisation).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sum_models.spec import FeatureSpec

__all__ = ["synthetic_user_batch", "user_tower_flops", "model_flops", "parameter_counts"]


def synthetic_user_batch(spec: FeatureSpec, batch_size: int = 8, ids_per_feature: int = 4) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """A deterministic user batch in the tower's input format (for FLOP counting, export and benchmarks).

    Args:
        spec: The input spec.
        batch_size: B.
        ids_per_feature: Ids in every bag.

    Returns:
        ``(dense [B, N_dense], sparse_ids, sparse_offsets)``.
    """
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(batch_size, len(spec.user_dense), generator=gen)
    ids: List[Tensor] = []
    offsets: List[Tensor] = []
    for hash_size in spec.user_sparse.values():
        ids.append(torch.randint(0, int(hash_size), (batch_size * ids_per_feature,), generator=gen))
        offsets.append(torch.arange(batch_size, dtype=torch.int64) * ids_per_feature)
    return dense, ids, offsets


def _count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def user_tower_flops(tower: nn.Module, spec: FeatureSpec | None = None, batch_size: int = 8) -> int:
    """Inference FLOPs per user of a user tower.

    Args:
        tower: A :class:`sum_models.user_tower.UserTower` (uses ``tower.spec`` unless ``spec`` is given).
        spec: Input spec.
        batch_size: Users in the counted batch (FLOPs are linear in it).

    Returns:
        FLOPs per user (forward pass).
    """
    spec = spec or tower.spec
    dense, ids, offsets = synthetic_user_batch(spec, batch_size)
    return _count(lambda: tower(dense, ids, offsets)) // batch_size


def model_flops(model: nn.Module, spec: FeatureSpec | None = None, batch_size: int = 8) -> Dict[str, int]:
    """Forward FLOPs per example of the whole model (user + mix tower) and of its user tower.

    Args:
        model: A :class:`sum_models.model.SUMModel`.
        spec: Input spec (default ``model.spec``).
        batch_size: Examples in the counted batch.

    Returns:
        ``{"user_tower": per user, "mix_tower": per example, "model": per example}`` (forward only;
        training costs about three times ``model``).
    """
    spec = spec or model.spec
    dense, ids, offsets = synthetic_user_batch(spec, batch_size)
    ad_sparse = torch.zeros(batch_size, len(spec.ad_sparse), dtype=torch.int64)
    ad_dense = torch.zeros(batch_size, len(spec.ad_dense))
    total = _count(lambda: model(dense, ids, offsets, ad_sparse, ad_dense)) // batch_size
    user = _count(lambda: model.user_tower(dense, ids, offsets)) // batch_size
    return {"user_tower": user, "mix_tower": total - user, "model": total}


def parameter_counts(module: nn.Module) -> Dict[str, int]:
    """Parameter counts, split into embedding tables and the rest.

    Args:
        module: A tower or a model.

    Returns:
        ``{"total", "embedding", "dense"}``; ``embedding`` counts ``nn.EmbeddingBag`` / ``nn.Embedding`` weights.
    """
    embedding = sum(
        m.weight.numel() for m in module.modules() if isinstance(m, (nn.EmbeddingBag, nn.Embedding))
    )
    total = sum(p.numel() for p in module.parameters())
    return {"total": int(total), "embedding": int(embedding), "dense": int(total - embedding)}
