"""The workspace's Feast store: config built in code, definitions applied from ``feature_repo/``."""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sum_models.spec import FeatureSpec
from sum_platform.config import PROJECT_ROOT, Params, load_params
from sum_platform.embedding_row import SLOTS, VALUE_PREFIX
from sum_platform.files import owner_only_secret
from sum_platform.workspace import Workspace

if TYPE_CHECKING:
    from feast import FeatureStore

#: The raw versions a ``sum_embeddings`` row keeps, latest first (the row's owner defines them).
EMBEDDING_SLOTS = SLOTS

EMBEDDINGS_VIEW = "sum_embeddings"
EMBEDDINGS_PUSH = "sum_embeddings_push"


def user_features_view(params: Params | None = None) -> str:
    """The Feast view holding the user tower's inputs (``source.user_features_view``: one per data source)."""
    return (params or load_params()).source.user_features_view


def repo_config(params: Params | None = None, online_store: dict | None = None):
    """Builds the Feast ``RepoConfig`` for the workspace (SQLite or Redis online, DuckDB offline over the parquet files).

    Args:
        params: Platform params; defaults to the params in force.
        online_store: Feast's ``online_store`` settings instead of the workspace's (a rebuild's staging store).

    Returns:
        A ``feast.repo_config.RepoConfig``.
    """
    from feast.repo_config import RepoConfig

    from sum_platform.offline_store import STORE_TYPE

    params = params or load_params()
    ws = Workspace(params.workspace)
    ws.feast_dir.mkdir(parents=True, exist_ok=True)
    return RepoConfig(
        project="sum",
        provider="local",
        registry=str(ws.feast_dir / "registry.db"),
        online_store=online_store or online_store_config(params),
        # Feast's DuckDB store, reading partitions of a growing schema (see sum_platform.offline_store).
        offline_store={"type": STORE_TYPE},
        entity_key_serialization_version=3,
        repo_path=feature_repo_dir(),
    )


def redis_paths(params: Params) -> tuple[Path, Path]:
    """``(data_dir, password_file)`` of the Redis online store (``feature_store.redis``; relative to the workspace)."""
    cfg, root = params.feature_store.redis, params.workspace
    return tuple((p if p.is_absolute() else root / p) for p in (Path(cfg.data_dir), Path(cfg.password_file)))


def redis_password(params: Params) -> str:
    """The Redis online store's password: generated once into ``feature_store.redis.password_file`` (0600).

    Hex behind a letter prefix: Feast's connection string splits on commas and JSON-decodes values, so an
    all-digit token would turn into a number.
    """
    path = redis_paths(params)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    return owner_only_secret(path, lambda: "sum-" + secrets.token_hex(24))


def online_store_config(params: Params) -> dict:
    """Feast's ``online_store`` settings for ``feature_store.online_store``: a SQLite file in the workspace, or
    the Redis server of ``feature_store.redis`` (started by ``sumctl up``, :mod:`sum_pipeline.redis_server`)."""
    if params.feature_store.online_store == "redis":
        cfg = params.feature_store.redis
        return {"type": "redis", "connection_string": f"{cfg.host}:{cfg.port},password={redis_password(params)}"}
    return {"type": "sqlite", "path": str(Workspace(params.workspace).feast_dir / "online_store.db")}


def get_store(params: Params | None = None, online_store: dict | None = None) -> "FeatureStore":
    """Opens the workspace's feature store (no network, no server); ``online_store``: see :func:`repo_config`."""
    from feast import FeatureStore

    return FeatureStore(config=repo_config(params, online_store))


def definitions(params: Params | None = None) -> list:
    """Executes ``feature_repo/definitions.py`` for the workspace of ``params``; returns its Feast objects."""
    from feast import Entity, FeatureView, PushSource
    from feast.data_source import DataSource

    params = params or load_params()
    with workspace_in_force(params.workspace):  # the file resolves its paths with load_params()
        defs = _load_definitions_module()
    return [
        obj
        for obj in vars(defs).values()
        if isinstance(obj, (Entity, FeatureView, PushSource, DataSource))
    ]


def apply_definitions(params: Params | None = None) -> "FeatureStore":
    """Applies the feature repo to the workspace store, as ``feast apply`` does. Idempotent."""
    store = get_store(params)
    store.apply(definitions(params))
    return store


def feature_spec(params: Params | None = None, store: "FeatureStore | None" = None) -> FeatureSpec:
    """Derives the model's input spec from the registered user feature view plus the events contract.

    Args:
        params: Platform params (ad-side features and labels come from its ``events`` section).
        store: An open store; defaults to :func:`get_store`.

    Returns:
        The :class:`FeatureSpec` the model is built from.
    """
    params = params or load_params()
    store = store or get_store(params)
    return spec_from_fields(store.get_feature_view(user_features_view(params)).features, params)


def spec_from_fields(fields: list, params: Params) -> FeatureSpec:
    """The spec of the user view's Feast ``Field`` s (registered or declared in code) and the events contract."""
    from feast.types import Array, Float32, Float64, Int32, Int64

    dense, sparse = [], {}
    for f in fields:
        if f.dtype in (Float32, Float64, Int32, Int64):
            dense.append(f.name)
        elif f.dtype in (Array(Int64), Array(Int32)):
            if "hash_size" not in f.tags:
                raise ValueError(f"sparse feature {f.name!r} needs a 'hash_size' tag in feature_repo")
            sparse[f.name] = int(f.tags["hash_size"])
        else:
            raise ValueError(f"feature {f.name!r} has unsupported dtype {f.dtype}")
    return FeatureSpec(
        user_dense=tuple(dense),
        user_sparse=sparse,
        ad_dense=tuple(params.events.ad_dense),
        ad_sparse=dict(params.events.ad_sparse),
        labels=tuple(params.events.labels),
    )


#: What a downstream model can be given, by the ``sum_embeddings`` columns that hold it: the served (pooled)
#: value of async / realtime serving, the daily batch value of offline mode, or the latest raw version
#: (no average pooling).
EMBEDDING_SOURCES = {"served": VALUE_PREFIX["served"][:-1], "batch": VALUE_PREFIX["batch"][:-1],
                     "raw": VALUE_PREFIX[SLOTS[0]][:-1]}


def historical_embeddings(store: "FeatureStore", entity_df, num_embeddings: int, source: str = "served",
                          timestamp: str = "event_ts"):
    """The SUM embeddings each row of ``entity_df`` would have been served at its ``timestamp`` (Feast's
    point-in-time join over the logged writes of ``sum_embeddings``: the latest write at or before it).

    Args:
        store: The workspace's store (its ``sum_embeddings`` writes logged offline, see
            ``serving.store_io.write_embeddings(to_offline=True)``).
        entity_df: ``user_id`` and ``timestamp`` per row (e.g. impressions), any other columns kept.
        num_embeddings: K.
        source: ``served`` | ``batch`` | ``raw`` (:data:`EMBEDDING_SOURCES`).

    Returns:
        ``entity_df`` (in its row order) with ``embedding_0 .. embedding_{K-1}`` (arrays, or None when
        nothing was written before the row's time), ``embedding_snapshot_id`` and ``embedding_written_at_ms``.
    """
    import pandas as pd

    prefix = EMBEDDING_SOURCES[source]
    id_col, ms_col = ("batch_snapshot_id", "batch_written_at_ms") if source == "batch" else ("snapshot_id", "written_at_ms")
    features = [f"{EMBEDDINGS_VIEW}:{prefix}_{k}" for k in range(num_embeddings)]
    features += [f"{EMBEDDINGS_VIEW}:{id_col}", f"{EMBEDDINGS_VIEW}:{ms_col}"]
    frame = entity_df.reset_index(drop=True).copy()
    frame["_row"] = range(len(frame))
    if timestamp != "event_timestamp":
        frame = frame.rename(columns={timestamp: "event_timestamp"})
    out = store.get_historical_features(entity_df=frame, features=features).to_df()
    out = out.sort_values("_row").drop(columns="_row").reset_index(drop=True)
    out = out.rename(columns={"event_timestamp": timestamp, id_col: "embedding_snapshot_id",
                              ms_col: "embedding_written_at_ms",
                              **{f"{prefix}_{k}": f"embedding_{k}" for k in range(num_embeddings)}})
    for k in range(num_embeddings):  # an empty stored array (no version in that slot) is no embedding
        out[f"embedding_{k}"] = [None if v is None or (hasattr(v, "__len__") and len(v) == 0) else v
                                 for v in out[f"embedding_{k}"]]
    out["embedding_written_at_ms"] = pd.to_numeric(out["embedding_written_at_ms"], errors="coerce")
    return out


def user_feature_fields(params: Params | None = None) -> list:
    """The user feature view's fields as declared in code (for the simulator; no registry needed)."""
    from feast import FeatureView

    name = user_features_view(params)
    for obj in definitions(params):
        if isinstance(obj, FeatureView) and obj.name == name:
            return list(obj.features)
    raise LookupError(f"feature_repo declares no {name!r} view (params source.user_features_view)")


def feature_repo_dir() -> Path:
    """The feature repo in force: ``$SUM_FEATURE_REPO`` (a folder holding ``definitions.py``), else the
    project's ``feature_repo/``."""
    env = os.environ.get("SUM_FEATURE_REPO")
    return Path(env).resolve() if env else PROJECT_ROOT / "feature_repo"


@contextmanager
def workspace_in_force(workspace: Path) -> Iterator[None]:
    """``$SUM_WORKSPACE`` set to ``workspace`` for the duration (then restored: no lasting side effect)."""
    old = os.environ.get("SUM_WORKSPACE")
    os.environ["SUM_WORKSPACE"] = str(workspace)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SUM_WORKSPACE", None)
        else:
            os.environ["SUM_WORKSPACE"] = old


def _load_definitions_module():
    """Executes ``<feature repo>/definitions.py`` afresh (by file path, so any folder works)."""
    path = feature_repo_dir() / "definitions.py"
    if not path.is_file():
        raise FileNotFoundError(f"feature repo definitions {path} not found (SUM_FEATURE_REPO={os.environ.get('SUM_FEATURE_REPO')!r})")
    name = "_sum_feature_repo_definitions"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses / pickling inside the file resolve their module
    spec.loader.exec_module(module)
    return module
