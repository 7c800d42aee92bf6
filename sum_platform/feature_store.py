"""The workspace's Feast store: config built in code, definitions applied from ``feature_repo/``."""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sum_models.shift import POOL_DEPTH
from sum_models.spec import FeatureSpec
from sum_platform.config import PROJECT_ROOT, Params, load_params
from sum_platform.workspace import Workspace

if TYPE_CHECKING:
    from feast import FeatureStore

#: The raw versions a ``sum_embeddings`` row keeps, latest first: ``raw``, ``prev1`` .. ``prev{POOL_DEPTH - 1}``
#: (paper §5.2: the served value pools the current version with the POOL_DEPTH - 1 most recent cached ones).
EMBEDDING_SLOTS = ("raw", *(f"prev{i}" for i in range(1, POOL_DEPTH)))

EMBEDDINGS_VIEW = "sum_embeddings"
EMBEDDINGS_PUSH = "sum_embeddings_push"


def user_features_view(params: Params | None = None) -> str:
    """The Feast view holding the user tower's inputs (``source.user_features_view``: one per data source)."""
    return (params or load_params()).source.user_features_view


def repo_config(params: Params | None = None):
    """Builds the Feast ``RepoConfig`` for the workspace (SQLite online, DuckDB offline over the parquet files).

    Args:
        params: Platform params; defaults to the params in force.

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
        online_store={"type": "sqlite", "path": str(ws.feast_dir / "online_store.db")},
        # Feast's DuckDB store, reading partitions of a growing schema (see sum_platform.offline_store).
        offline_store={"type": STORE_TYPE},
        entity_key_serialization_version=3,
        repo_path=feature_repo_dir(),
    )


def get_store(params: Params | None = None) -> "FeatureStore":
    """Opens the workspace's feature store (no network, no server)."""
    from feast import FeatureStore

    return FeatureStore(config=repo_config(params))


def definitions(params: Params | None = None) -> list:
    """Executes ``feature_repo/definitions.py`` for the workspace of ``params``; returns its Feast objects."""
    from feast import Entity, FeatureView, PushSource
    from feast.data_source import DataSource

    params = params or load_params()
    with _workspace_in_force(params.workspace):  # the file resolves its paths with load_params()
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
def _workspace_in_force(workspace: Path) -> Iterator[None]:
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
