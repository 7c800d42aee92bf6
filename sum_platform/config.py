"""Typed view of `params.yaml`, the one config every stage reads.

The file is located through ``SUM_PARAMS`` (tests point it at a copy) and defaults to the project's own
``params.yaml``. Relative paths in it resolve against the directory holding the file.

The models here give types and bounds, not values: every setting params.yaml spells out is a required
field, so the file is the one source of the numbers. The exceptions are optional by design: the gate's
thresholds (None: the gate refuses to bless and names the missing key) and ``model.presets`` (empty: the
built-in presets of ``sum_models.presets``).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sum_models.presets import resolve_architecture  # torch-free
from sum_platform.embedding_row import PoolUnit

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    workspace: str
    dvc_remote: str


class SimulatorConfig(_Section):
    start_date: str
    initial_users: int
    new_users_per_day: int
    active_fraction: float
    impressions_per_active_user: int
    latent_dim: int
    interest_drift: float
    id_meaning_shift: float
    n_ads: int
    n_ad_categories: int
    base_click_logit: float
    base_conversion_logit: float
    interest_strength: float
    seed: int | None                           # the world's seed; None: params.seed (a study sets one per seed)
    click_propensity_sd: float = Field(ge=0)   # sd of a user's base click logit (drawn once per user)
    conversion_propensity_sd: float = Field(ge=0)
    dense_ema_weight: float = Field(gt=0, le=1)  # a day's observation's weight in a dense feature (1: no memory)
    list_turnover: float = Field(ge=0, le=1)   # share of a user's list ids replaced each day (1: redrawn daily)
    intraday_updates: bool                     # users partition: + a timestamped row per click within the day
    intraday_list: str                         # the id list a click appends the clicked ad's id to
    intraday_delay_seconds: float = Field(ge=0)  # click -> updated feature row (the feature pipeline's latency)


class MovieLensSourceConfig(_Section):
    cache_dir: str                             # where the recbole wheel is downloaded (relative: to the params file)


class ParquetSourceConfig(_Section):
    """A user's own files, mapped to the data contract by column names (``sum_platform.sources``)."""

    events: str | None                         # glob of the impression files
    users: str | None                          # glob of the user-feature files (daily snapshots)
    # Contract column -> the files' column; a contract column not named here is read under its own name.
    events_columns: dict[str, str]
    users_columns: dict[str, str]


class SourceConfig(_Section):
    """Where a day's partitions come from, and which Feast view holds the user tower's inputs."""

    kind: Literal["simulator", "movielens", "parquet"]
    user_features_view: str
    movielens: MovieLensSourceConfig
    parquet: ParquetSourceConfig


class EventsConfig(_Section):
    user_id: str
    timestamp: str
    labels: list[str]
    ad_sparse: dict[str, int]
    ad_dense: list[str]
    holdout_fraction: float


class ModelConfig(_Section):
    """The SUM model (sum_models): K, D, input layers and the architecture preset.

    ``preset`` names a user tower + mix tower architecture: a built-in one (``compact``, ``large``,
    ``paper``, defined in ``sum_models.presets``) or one defined under ``presets`` (same name: replaces it).
    ``hidden_dim`` / ``mix_hidden_dim`` are the default widths of layers a preset leaves unset.
    """

    num_embeddings: int
    embedding_dim: int
    sparse_pooling: str
    dense_tokens: int
    hidden_dim: int
    mix_hidden_dim: int
    # The bound on the scale of each user embedding the tower outputs (sum_models/output_bound.py): none | layernorm
    # | l2; output_scale is a bounded embedding's root-mean-square coordinate (its norm: output_scale * sqrt(D)).
    output_norm: Literal["none", "layernorm", "l2"]
    output_scale: float = Field(gt=0, allow_inf_nan=False)
    preset: str
    # Optional: the built-ins of sum_models.presets are the presets unless params.yaml adds or replaces one.
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_architecture(self) -> "ModelConfig":
        resolve_architecture(self.model_dump(mode="json"))  # unknown preset / extractor / option -> error
        return self


class TrainConfig(_Section):
    optimizer: str
    batch_size: int
    epochs: int
    learning_rate: float
    weight_decay: float
    task_weights: dict[str, float]
    # Data-parallel training on the Ray cluster (sum_models/distributed.py) when workers > 1.
    workers: int = Field(ge=1)
    cpus_per_worker: float = Field(gt=0)
    threads_per_worker: int = Field(ge=1)


class InferenceConfig(_Section):
    """The daily batch embeddings (``materialize_embeddings``)."""

    engine: Literal["task", "ray_data"]        # a loop in the task, or a Ray Data pipeline on the cluster
    batch_size: int = Field(ge=1)              # users per tower call (per Ray Data batch)
    actors: int = Field(ge=1)                  # ray_data: actors holding the exported tower
    cpus_per_actor: float = Field(gt=0)


class RedisConfig(_Section):
    host: str
    port: int
    data_dir: str                              # relative: to the workspace (its RDB/AOF files)
    password_file: str                         # relative: to the workspace; generated once, mode 0600


class FeatureStoreConfig(_Section):
    online_store: Literal["sqlite", "redis"]   # redis: the stack starts redis-server (sum_pipeline/redis_server.py)
    redis: RedisConfig


class GateConfig(_Section):
    """Thresholds of the snapshot gate (validation/gate.py).

    A threshold left out is None, not a number: the gate then refuses to bless and names the missing key.
    """

    probe_users: int
    warmup_promotions: int = Field(ge=1)       # shift is enforced once this many snapshots were promoted
    min_mean_cosine: float | None = None
    max_relative_l2_change: float | None = None
    max_ne: float | None = None
    min_mean_cosine_pooled: float | None = None
    max_relative_l2_change_pooled: float | None = None
    max_ne_regression: float | None = None
    min_embedding_std: float
    max_cosine_across_users: float = Field(gt=-1, le=1)  # per embedding: mean pairwise cosine of the probe users
    min_label_count: int = Field(ge=1)         # an NE check needs this many holdout positives and negatives
    # An NE check that is not measurable (too few labels) on a candidate with no production to compare it with:
    # hold it (nothing else vouches for it) or bless on the other checks. With production, the shift decides.
    not_measurable_without_production: Literal["hold", "bless"]
    # The consumer check (validation/consumers.py): what holds a candidate, and the check's own settings.
    mode: Literal["proxies", "consumers", "both"]
    consumer_holdout_users: float = Field(ge=0, lt=1)  # share of users kept out of the candidate's training
    consumer_max_ne_regression_pct: float = Field(ge=0)  # a consumer's NE may worsen by this (relative, %)
    consumer_worse_tolerance: float = Field(gt=0, lt=1)  # a prediction this much further from its label: worse
    consumer_bootstrap: int = Field(ge=100)            # paired-interval resamples


class ValidationConfig(_Section):
    """Thresholds of the data gate's relative checks (validation/suites.py, profiles.py), against trailing days.

    "Trailing days" are the previously *validated* partitions of the workspace (their profiles are kept
    only for days that passed, so a bad day never becomes a baseline). With no such day the relative
    checks are skipped, and the report says so.
    """

    trailing_days: int = Field(ge=1)           # validated days the row-count and label-rate checks use
    row_count_min_ratio: float                 # rows / trailing median rows
    row_count_max_ratio: float
    label_rate_max_relative_change: float      # |label rate / trailing mean rate - 1|
    drift_bins: int = Field(ge=2)              # quantile bins of the previous validated day
    drift_max_kl: float                        # KL(today || previous day) of a dense feature
    sparse_length_max_kl: float                # same, for the length of a sparse id list
    max_out_of_range_id_share: float           # share of id lists with an id >= hash size: warn up to, fail above
    stuck_check_kinds: list[str]
    min_event_rows: int = Field(ge=1)          # an events partition with fewer rows fails (too little to train on)
    label_rate_noise_z: float = Field(ge=0)    # label-rate bounds widen to this many binomial standard errors
    # Rare extreme values: each drift column's values must lie within the trailing validated days' robust range
    # (their [q, 1 - q] quantiles, q = extreme_tail_quantile) widened by extreme_span_multiple x its width on
    # both sides; more than extreme_max_share of the rows beyond it fails (0: a single row does).
    extreme_tail_quantile: float = Field(gt=0, lt=0.5)
    extreme_span_multiple: float = Field(ge=0)
    extreme_max_share: float = Field(ge=0, lt=1)
    extreme_min_days: int = Field(ge=1)  # validated days before the check runs (a source's first days
                                                    # have no range yet: cumulative counts all 0 on day 1)


#: Hard cap on ids in one batch request body (``serving.max_batch_users`` is the configured bound under it).
BATCH_HARD_MAX = 10_000
#: SOAP's serving modes (paper Table 2): cached + async recompute, wait for compute, daily batch only, first snapshot.
Mode = Literal["async", "realtime", "offline", "frozen"]


class ServingConfig(_Section):
    host: str
    port: int
    app_name: str
    route_prefix: str
    max_inflight_compute: int = Field(ge=1)
    ray_address: str
    mode: Mode
    pool_unit: PoolUnit                       # a version per snapshot or per write (sum_platform/embedding_row.py)
    realtime_budget_ms: float = Field(gt=0)
    frozen_timeout_ms: float = Field(gt=0)
    max_batch_users: int = Field(ge=1, le=BATCH_HARD_MAX)
    compute_max_batch_size: int = Field(ge=1)
    compute_batch_wait_ms: float = Field(ge=0)
    compute_write_coalesce_ms: float = Field(ge=0, le=1000)
    compute_coalesce_ms: float = Field(ge=0, le=1000)
    compute_coalesce_max_users: int = Field(ge=1)
    compute_niceness: int = Field(ge=0, le=19)
    compute_sched_idle: bool
    compute_cpus: Literal["last"] | list[int] | None
    ray_worker_niceness: int = Field(ge=0, le=19)
    access_log: bool
    rollout_timeout_s: float = Field(gt=0)
    compute_replicas: int = Field(ge=1)       # replicas of the compute deployment (one per node with several nodes)
    max_request_bytes: int = Field(ge=1024)   # larger request bodies: 413, never read whole
    token_file: str | None                    # bearer token of the HTTP API (relative: to the workspace); required
                                              # when host is not loopback (null: none)


class PostgresConfig(_Section):
    host: str
    port: int
    database: str
    user: str


class AirflowConfig(_Section):
    host: str
    port: int
    parallelism: int = Field(ge=1)
    scheduler_idle_sleep_seconds: float = Field(gt=0)
    metadata_db: Literal["sqlite", "postgresql"]
    postgresql: PostgresConfig
    start_date: str
    end_date: str | None
    catchup: bool
    approval_timeout_minutes: float = Field(gt=0)
    task_retries: int = Field(ge=0)
    retry_delay_seconds: float = Field(ge=0)
    dag_poll_seconds: float = Field(gt=0)


class RayClusterConfig(_Section):
    node_ip: str
    gcs_port: int
    dashboard_host: str
    dashboard_port: int
    client_server_port: int = Field(ge=1024, le=65535)  # Ray Client (ray://), head only
    num_cpus: int = Field(ge=1)
    object_store_mb: int = Field(ge=75)
    worker_nodes: int = Field(ge=0)            # more Ray nodes on this machine, each a raylet of its own
    worker_num_cpus: int = Field(ge=1)
    worker_object_store_mb: int = Field(ge=75)


class DownstreamUserFeatures(_Section):
    """One downstream model's own user features: the view's first ``dense`` dense features and these id lists."""

    dense: int = Field(ge=0)
    lists: list[str]


class DownstreamConfig(_Section):
    """Downstream ranking models consuming the SUM embeddings (sum_models/downstream.py): the DAG
    ``sum_downstream`` retrains them on each promoted day; ``sumctl study`` trains them alike."""

    retrain_on_promotion: bool                 # the stack unpauses sum_downstream (scheduled on the promotion)
    models: list[str] = Field(min_length=1)    # presets of sum_models.downstream.PRESETS
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    user_features: dict[str, DownstreamUserFeatures]  # per model: its own user features
    list_table_size: int = Field(ge=1)         # rows of an id list's EmbeddingBag (ids modulo it)

    @model_validator(mode="after")
    def _every_model_has_user_features(self) -> "DownstreamConfig":
        missing = [m for m in self.models if m not in self.user_features]
        if missing:
            raise ValueError(f"downstream.user_features has no entry for model(s) {missing}")
        return self


class StudyConfig(_Section):
    """``sumctl study`` (sum_pipeline/study.py): the paper's Tables 1-4 on the configured source."""

    days: int = Field(ge=3)                    # the window: usable days (>= validation.min_event_rows) after the warm-up
    eval_days: int = Field(ge=1)               # the last of them: downstream models are evaluated there
    warmup_days: int = Field(ge=0)             # upstream-only days before the window; frozen = their last snapshot
    warmup_epochs: int = Field(ge=1)           # the upstream's epochs on a warm-up day (train.epochs in the window)
    offline_staleness_days: int = Field(ge=1)  # offline batch mode reads the batch written after day t - this
    gate_snapshots: bool                       # serve only snapshots the gate blesses (sum_pipeline/study_gate.py)
    consumer_gated_arm: bool                   # an async arm served only by snapshots the consumer check passes
    seeds: int = Field(ge=1)
    workers: int = Field(ge=1)                 # processes the seeds run in (one core each)
    downstream_batch_size: int = Field(ge=1)   # the study's downstream training batch (downstream.epochs a day)
    importance_repeats: int = Field(ge=1)
    replay_batch: int = Field(ge=1)            # requests per compute call in the replay (coalescing)
    realtime_fallback_rate: float = Field(ge=0, le=1)
    report_dir: str


class ReproConfig(_Section):
    ds: str


class Params(_Section):
    profile: str | list[str] | None          # the profile(s) in force (see :func:`apply_profile`)
    seed: int
    paths: PathsConfig
    source: SourceConfig
    simulator: SimulatorConfig
    events: EventsConfig
    model: ModelConfig
    train: TrainConfig
    inference: InferenceConfig
    feature_store: FeatureStoreConfig
    gate: GateConfig
    serving: ServingConfig
    validation: ValidationConfig
    airflow: AirflowConfig
    ray: RayClusterConfig
    downstream: DownstreamConfig
    study: StudyConfig
    repro: ReproConfig
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


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: mappings key by key (recursively), anything else replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_profile(raw: dict) -> dict:
    """The params of ``raw`` with the profile(s) its ``profile`` key names merged in (null: the file as written).

    A profile is a partial params file under ``profiles.<name>`` (e.g. ``movielens``: the MovieLens source,
    its feature view, its calibrated checks and its own workspace; ``redis``: the online store on Redis). A list
    of names merges each in turn (a later one wins where two set the same key). It is chosen in the file, not in
    the environment, so every process that reads the file (Airflow's tasks, Serve's replicas, ``dvc repro``)
    sees the same params.

    Raises:
        ValueError: a named profile is not defined in the file.
    """
    profiles = raw.pop("profiles", None) or {}
    names = raw.get("profile") or []
    for name in [names] if isinstance(names, str) else names:
        if name not in profiles:
            raise ValueError(f"params profile {name!r} is not defined (profiles: {sorted(profiles) or 'none'})")
        raw = merge(raw, profiles[name])
    return raw


def params_path() -> Path:
    """Returns the params file in force (``SUM_PARAMS`` or the project's ``params.yaml``)."""
    return Path(os.environ.get("SUM_PARAMS", PROJECT_ROOT / "params.yaml")).resolve()


def _read(path: Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


@lru_cache(maxsize=8)
def _load(path: Path, mtime: float) -> Params:
    return Params(**apply_profile(_read(path)), base_dir=path.parent)


def load_profile(profile: str | None, path: str | os.PathLike | None = None) -> Params:
    """The params of a file with ``profile`` in force instead of the one the file names (None: no profile).

    For commands that compare sources side by side (``sumctl study --dataset``); the daily platform reads the
    file's own choice (:func:`load_params`).
    """
    p = Path(path).resolve() if path else params_path()
    return Params(**apply_profile(_read(p) | {"profile": profile}), base_dir=p.parent)


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Loads and validates the params file, with the profile in force merged in (:func:`apply_profile`).

    Args:
        path: A params file; defaults to :func:`params_path`.

    Returns:
        The validated :class:`Params`.
    """
    p = Path(path).resolve() if path else params_path()
    return _load(p, p.stat().st_mtime)
