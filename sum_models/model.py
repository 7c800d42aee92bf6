"""The SUM upstream user model (paper Fig. 2): user tower + mix tower."""

from __future__ import annotations

from typing import Any, List, Mapping

import torch
from torch import Tensor, nn

from sum_models.mix_tower import MixTower
from sum_models.presets import config_dict, resolve_architecture
from sum_models.spec import FeatureSpec
from sum_models.user_tower import UserTower

__all__ = [
    "SUMModel",
    "build_model",
    "model_config_dict",
    "SpecMismatchError",
    "check_spec",
]


def model_config_dict(model_cfg: Any) -> dict[str, Any]:
    """Resolves a model config to the full architecture dict the model is built from.

    Args:
        model_cfg: ``params.model`` (a pydantic ``ModelConfig``), a mapping (a ``model`` section or an
            already resolved architecture, e.g. a snapshot's ``config.json``), or None for the defaults.

    Returns:
        The resolved architecture (see :func:`sum_models.presets.resolve_architecture`): JSON-serialisable,
        every layer explicit.
    """
    return resolve_architecture(config_dict(model_cfg, "model"))


class SpecMismatchError(RuntimeError):
    """A model (or tower) is asked to score inputs encoded with another spec than the one it was built for."""


_USER_FIELDS = ("user_dense", "user_sparse")
_ALL_FIELDS = _USER_FIELDS + ("ad_dense", "ad_sparse", "labels")


def _ordered(value: Any) -> tuple:
    # Order matters (it is the order of tables and tokens), so compare ordered items, not dicts.
    return tuple(value.items()) if isinstance(value, Mapping) else tuple(value)


def check_spec(model_spec: FeatureSpec | None, spec: FeatureSpec, user_only: bool = False) -> None:
    """Checks that inputs encoded with ``spec`` fit a module built for ``model_spec`` (order included).

    Args:
        model_spec: The spec the module was built with (None: nothing to check).
        spec: The spec the caller encodes with.
        user_only: Compare only the user features (for the user tower).

    Raises:
        SpecMismatchError: The specs differ; the message says how. Pass the module's own ``.spec`` to
            score a frame that holds its columns.
    """
    if model_spec is None:
        return
    fields = _USER_FIELDS if user_only else _ALL_FIELDS
    diffs = [
        f"{f}: model {getattr(model_spec, f)!r} vs given {getattr(spec, f)!r}"
        for f in fields
        if _ordered(getattr(model_spec, f)) != _ordered(getattr(spec, f))
    ]
    if diffs:
        raise SpecMismatchError("inputs do not match the model's spec (use the model's .spec): " + "; ".join(diffs))


class SUMModel(nn.Module):
    """User tower + mix tower.

    Args:
        spec: Model input spec.
        model_cfg: ``params.model``, an equivalent dict or a resolved architecture (see
            :func:`model_config_dict`); ``self.config`` holds the resolved architecture.
    """

    examples_seen: Tensor

    def __init__(self, spec: FeatureSpec, model_cfg: Any = None) -> None:
        super().__init__()
        cfg = model_config_dict(model_cfg)
        self.spec = spec
        self.config = cfg
        self.user_tower = UserTower(spec, cfg)
        self.mix_tower = MixTower(spec, cfg)
        # Training examples seen over the model's life (kept by snapshots and warm starts); 0 = fresh model.
        self.register_buffer("examples_seen", torch.zeros((), dtype=torch.int64))

    def init_task_priors(self, base_rates: Tensor) -> None:
        """Sets each task head's bias to the logit of its base rate (see :meth:`MixTower.init_task_priors`)."""
        self.mix_tower.init_task_priors(base_rates)

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
            dense: float32 ``[B, N_dense]`` dense user features.
            sparse_ids: ``N_sparse`` int64 1-D EmbeddingBag id tensors.
            sparse_offsets: ``N_sparse`` int64 ``[B]`` EmbeddingBag offsets.
            ad_sparse: int64 ``[B, N_ad_sparse]``.
            ad_dense: float32 ``[B, N_ad_dense]``.

        Returns:
            float32 logits ``[B, T]`` in ``spec.labels`` order.
        """
        user_embeddings = self.user_tower(dense, sparse_ids, sparse_offsets)  # [B, K, D]
        return self.mix_tower(user_embeddings, ad_sparse, ad_dense)  # [B, T]


def build_model(spec: FeatureSpec, model_cfg: Any = None, seed: int = 0) -> SUMModel:
    """Builds a freshly initialised model, deterministically for a seed.

    The global torch RNG state is left untouched.

    Args:
        spec: Model input spec.
        model_cfg: ``params.model`` or an equivalent dict.
        seed: Initialisation seed.

    Returns:
        The model, in train mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SUMModel(spec, model_cfg)
