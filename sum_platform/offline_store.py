"""Feast's DuckDB offline store, reading daily parquet partitions whose schemas grow over time.

Feast's DuckDB offline store runs the point-in-time join in SQL, where its dask ("file") store merges every
impression with every stored feature row of its user before applying the TTL, so the dask join of one day
grew with the history (90 s for 83k impressions after 30 days, against ~1 s here, same rows).

The one thing Feast's store does not do for this layout is read partitions written before a field was
added to the view: DuckDB's multi-file reader takes the columns of the first file and refuses files that
lack one. This store passes ``union_by_name=True`` (columns matched by name; missing ones read as NULL) and
``hive_partitioning=True`` (``ds=`` from the folder names) for local parquet ``FileSource`` globs, and
otherwise delegates to Feast. Select it with ``offline_store: {type:
sum_platform.offline_store.PartitionedDuckDBOfflineStore}`` (Feast's convention for custom stores: the
config class is the store class name plus ``Config``, in the same module).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Union

from feast.data_format import ParquetFormat
from feast.infra.offline_stores.duckdb import (
    DuckDBOfflineStore,
    DuckDBOfflineStoreConfig,
    _read_data_source,
    _write_data_source,
)
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.ibis import (
    get_historical_features_ibis,
    pull_all_from_table_or_query_ibis,
    pull_latest_from_table_or_query_ibis,
)
from pydantic import StrictStr

from sum_platform.offline_log import append_rows, partition_root

if TYPE_CHECKING:
    import pandas as pd
    from feast.data_source import DataSource
    from feast.feature_view import FeatureView
    from feast.infra.offline_stores.offline_store import RetrievalJob
    from feast.infra.registry.base_registry import BaseRegistry
    from feast.repo_config import RepoConfig
    from ibis.expr.types import Table

STORE_TYPE = "sum_platform.offline_store.PartitionedDuckDBOfflineStore"


class PartitionedDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """Config of :class:`PartitionedDuckDBOfflineStore` (the DuckDB store's options)."""

    type: StrictStr = STORE_TYPE


def read_partitioned_source(data_source: "DataSource", repo_path: str) -> "Table":
    """Reads a local parquet ``FileSource`` with schemas unified by column name; anything else as Feast does.

    Args:
        data_source: The feature view's batch source.
        repo_path: The feature repo path (relative source paths are resolved by Feast against it).

    Returns:
        An ibis table over the source.
    """
    import ibis

    # DuckDB draws a progress bar on the terminal for long joins: component output goes to logs, not there.
    ibis.get_backend().raw_sql("SET enable_progress_bar = false")
    path = getattr(data_source, "path", "") or ""
    local = "://" not in path or path.startswith("file://")
    if isinstance(data_source, FileSource) and isinstance(data_source.file_format, ParquetFormat) and local:
        return ibis.read_parquet(path, union_by_name=True, hive_partitioning=True)
    return _read_data_source(data_source, repo_path)


def _io_options(config: "RepoConfig") -> dict:
    """The reader/writer and staging arguments every ibis-backed call of this store takes."""
    return {
        "data_source_reader": read_partitioned_source,
        "data_source_writer": _write_data_source,
        "staging_location": config.offline_store.staging_location,
        "staging_location_endpoint_override": config.offline_store.staging_location_endpoint_override,
    }


class PartitionedDuckDBOfflineStore(DuckDBOfflineStore):
    """Feast's DuckDB offline store with :func:`read_partitioned_source` as its reader (Feast's interface
    signatures, each delegating to the same ibis function as the parent)."""

    @staticmethod
    def pull_latest_from_table_or_query(
        config: "RepoConfig",
        data_source: "DataSource",
        join_key_columns: List[str],
        feature_name_columns: List[str],
        timestamp_field: str,
        created_timestamp_column: Optional[str],
        start_date: datetime,
        end_date: datetime,
    ) -> "RetrievalJob":
        return pull_latest_from_table_or_query_ibis(
            config=config,
            data_source=data_source,
            join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns,
            timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column,
            start_date=start_date,
            end_date=end_date,
            **_io_options(config),
        )

    @staticmethod
    def get_historical_features(
        config: "RepoConfig",
        feature_views: List["FeatureView"],
        feature_refs: List[str],
        entity_df: Union["pd.DataFrame", str],
        registry: "BaseRegistry",
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> "RetrievalJob":
        return get_historical_features_ibis(
            config=config,
            feature_views=feature_views,
            feature_refs=feature_refs,
            entity_df=entity_df,
            registry=registry,
            project=project,
            full_feature_names=full_feature_names,
            **_io_options(config),
            filter_by_created_timestamp=filter_by_created_timestamp,
        )

    @staticmethod
    def offline_write_batch(
        config: "RepoConfig",
        feature_view: "FeatureView",
        table: Any,
        progress: Optional[Callable[[int], Any]],
    ) -> None:
        """Feast's ``push(..., to=ONLINE_AND_OFFLINE)`` / ``write_to_offline_store``: :func:`append_rows`."""
        source = feature_view.batch_source
        append_rows(partition_root(source.path), table.to_pandas(), source.timestamp_field)
        if progress:
            progress(table.num_rows)

    @staticmethod
    def pull_all_from_table_or_query(
        config: "RepoConfig",
        data_source: "DataSource",
        join_key_columns: List[str],
        feature_name_columns: List[str],
        timestamp_field: str,
        created_timestamp_column: Optional[str] = None,
        start_date: Optional[datetime] = None,
        end_date: Optional[datetime] = None,
    ) -> "RetrievalJob":
        return pull_all_from_table_or_query_ibis(
            config=config,
            data_source=data_source,
            join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns,
            timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column,
            start_date=start_date,
            end_date=end_date,
            **_io_options(config),
        )
