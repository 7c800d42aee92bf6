"""The shared base of the SUM platform: what the model's users (gates, serving, the daily tasks) stand on.

It imports only ``sum_models`` (the model's input spec and pooling depth) and libraries; every other
package may import it.

Modules:
    config         params.yaml as typed, closed pydantic models (load_params, Params, Mode, BATCH_HARD_MAX)
    workspace      the artifact workspace's layout (Workspace, ds_str, snapshot_id_for)
    day_record     DayRecord: a date's state under runs/<ds>/ (spec, validation, data version, evaluation,
                   verdict, data profile, cached join) and the lineage fields derived from it
    context        Context: params + workspace + registry, the day records (context())
    files          atomic writes: replace_atomically, write_json / read_json, write_parquet, write_partition
    partitions     read_partition: the one route to a daily partition's files
    feature_store  Feast glue: repo config, the feature repo's definitions, apply, the model's spec, view names
    offline_store  Feast's DuckDB offline store reading partitions of a growing schema
    registry       the snapshot registry (SQLite): stages, lineage records, atomic promotion, audit log
    versioning     DVC + GTO: tracking, pushing, version and stage tags, restoring
    simulate       the seeded simulator of daily partitions
"""
