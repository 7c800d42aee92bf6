"""Typed view of `params.yaml`, the one config every stage reads.

The file is located through ``SUM_PARAMS`` (tests point it at a copy) and defaults to the project's own
``params.yaml``. Relative paths in it resolve against the directory holding the file.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    workspace: str = ".sum/workspace"
    dvc_remote: str = ".sum/dvc-remote"


class SimulatorConfig(_Section):
    start_date: str = "2026-01-01"
    initial_users: int = 1500
    new_users_per_day: int = 100
    active_fraction: float = 0.7
    impressions_per_active_user: int = 6
    latent_dim: int = 8
    interest_drift: float = 0.08
    id_meaning_shift: float = 0.01
    n_ads: int = 400
    n_ad_categories: int = 16
    base_click_logit: float = -2.6
    base_conversion_logit: float = -1.2
    interest_strength: float = 1.6


class EventsConfig(_Section):
    user_id: str = "user_id"
    timestamp: str = "event_ts"
    labels: list[str] = Field(default_factory=lambda: ["click", "conversion"])
    ad_sparse: dict[str, int] = Field(default_factory=lambda: {"ad_id": 400, "ad_category": 16})
    ad_dense: list[str] = Field(default_factory=lambda: ["ad_quality", "ad_price"])
    holdout_fraction: float = 0.15


class ModelConfig(_Section):
    """The SUM model (sum_models): K, D, input layers and the architecture preset.

    ``preset`` names a user tower + mix tower architecture: a built-in one (``compact``, ``large``,
    ``paper``; see ``sum_models.presets``) or one defined under ``presets`` (same name: replaces it).
    ``hidden_dim`` / ``mix_hidden_dim`` are the default widths of layers a preset leaves unset.
    """

    num_embeddings: int = 2
    embedding_dim: int = 96
    sparse_pooling: str = "mean"
    dense_tokens: int = 0
    hidden_dim: int = 128
    mix_hidden_dim: int = 128
    preset: str = "compact"
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_architecture(self) -> "ModelConfig":
        from sum_models.presets import resolve_architecture  # torch-free

        resolve_architecture(self.model_dump(mode="json"))  # unknown preset / extractor / option -> error
        return self


class TrainConfig(_Section):
    optimizer: str = "adam"
    batch_size: int = 512
    epochs: int = 2
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    task_weights: dict[str, float] = Field(default_factory=lambda: {"click": 1.0, "conversion": 0.5})


class GateConfig(_Section):
    probe_users: int = 512
    min_mean_cosine: float | None = None
    max_relative_l2_change: float | None = None
    max_ne: float | None = None
    min_mean_cosine_pooled: float | None = None
    max_relative_l2_change_pooled: float | None = None
    max_ne_regression: float | None = None
    min_embedding_std: float = 1e-4


class ValidationConfig(_Section):
    """Thresholds of the data gate's relative checks (validation/data_checks.py), against trailing days.

    "Trailing days" are the previously *validated* partitions of the workspace (their profiles are kept
    only for days that passed, so a bad day never becomes a baseline). With no such day the relative
    checks are skipped, and the report says so.
    """

    trailing_days: int = Field(default=7, ge=1)   # validated days the row-count and label-rate checks use
    row_count_min_ratio: float = 0.5               # rows / trailing median rows
    row_count_max_ratio: float = 2.0
    label_rate_max_relative_change: float = 0.25   # |label rate / trailing mean rate - 1|
    drift_bins: int = Field(default=10, ge=2)      # quantile bins of the previous validated day
    drift_max_kl: float = 0.05                     # KL(today || previous day) of a dense feature
    sparse_length_max_kl: float = 0.05             # same, for the length of a sparse id list
    max_out_of_range_id_share: float = 0.01        # share of id lists with an id >= hash size: warn up to, fail above
    stuck_check_kinds: list[str] = Field(default_factory=lambda: ["events", "users"])


class ServingConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "soap"
    route_prefix: str = "/"
    max_inflight_compute: int = Field(64, ge=1)
    ray_address: str = "auto"
    mode: Literal["async", "realtime", "offline", "frozen"] = "async"
    realtime_budget_ms: float = Field(30.0, gt=0)
    frozen_timeout_ms: float = Field(1000.0, gt=0)
    max_batch_users: int = Field(256, ge=1, le=10_000)
    compute_max_batch_size: int = Field(32, ge=1)
    compute_batch_wait_ms: float = Field(2.0, ge=0)
    compute_coalesce_ms: float = Field(500.0, ge=0, le=1000)
    compute_coalesce_max_users: int = Field(64, ge=1)
    compute_niceness: int = Field(19, ge=0, le=19)
    compute_sched_idle: bool = True
    compute_cpus: Literal["last"] | list[int] | None = "last"
    ray_worker_niceness: int = Field(0, ge=0, le=19)
    access_log: bool = False


class ReproConfig(_Section):
    ds: str = "2026-01-01"


class Params(_Section):
    seed: int = 7
    paths: PathsConfig = PathsConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    events: EventsConfig = EventsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    validation: ValidationConfig = ValidationConfig()
    repro: ReproConfig = ReproConfig()
    # Directory of the params file; relative paths resolve against it.
    base_dir: Path = Field(default=PROJECT_ROOT, exclude=True)

    def resolve(self, path: str | os.PathLike) -> Path:
        """Resolves a path from the config against the params file's directory."""
        p = Path(path)
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def workspace(self) -> Path:
        """The artifact workspace; ``SUM_WORKSPACE`` overrides the configured one."""
        env = os.environ.get("SUM_WORKSPACE")
        return Path(env).resolve() if env else self.resolve(self.paths.workspace)

    @property
    def dvc_remote(self) -> str:
        env = os.environ.get("SUM_DVC_REMOTE")
        if env:
            return env
        remote = self.paths.dvc_remote
        return remote if "://" in remote else str(self.resolve(remote))

    def digest(self) -> str:
        """A short hash of the effective params, recorded in every snapshot's lineage."""
        payload = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def params_path() -> Path:
    """Returns the params file in force (``SUM_PARAMS`` or the project's ``params.yaml``)."""
    return Path(os.environ.get("SUM_PARAMS", PROJECT_ROOT / "params.yaml")).resolve()


@lru_cache(maxsize=8)
def _load(path: Path, mtime: float) -> Params:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    return Params(**raw, base_dir=path.parent)


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Loads and validates the params file.

    Args:
        path: A params file; defaults to :func:`params_path`.

    Returns:
        The validated :class:`Params`.
    """
    p = Path(path).resolve() if path else params_path()
    return _load(p, p.stat().st_mtime)
