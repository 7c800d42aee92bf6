"""Feast objects of the SUM platform, declared once, one object per concept.

These declarations are the schema of the user tower's inputs: `sum_models` builds its embedding tables
and dense projections from :data:`user_features` (field names, dtypes and the ``hash_size`` tag), and the
simulator generates exactly these columns. Adding a field here and running ``feast apply`` (or the next
daily run, which applies the repo) changes the next model with no other code change.

Conventions for user features:
    * ``Float32`` field: a dense feature (one token after projection).
    * ``Array(Int64)`` field: a variable-length sparse id list; tag ``hash_size`` (ids are taken modulo it)
      and optional ``mean_length`` (used by the simulator only).

The embeddings view stores fp16-rounded values as ``Array(Float32)`` because Feast has no fp16 type:
every value written is exactly representable in fp16, so casting back to fp16 is lossless.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Bytes, Float32, Int64, String

from sum_models.shift import POOL_DEPTH
from sum_platform.config import load_params
from sum_platform.embedding_row import PACKED_FIELDS, SLOT_ID_FIELDS, SLOTS, VALUE_PREFIX, batch_fields
from sum_platform.workspace import Workspace

# The workspace and K of the params in force (the platform's one rule: $SUM_PARAMS, $SUM_WORKSPACE).
_PARAMS = load_params()
_DATA = Workspace(_PARAMS.workspace).data
NUM_EMBEDDINGS = _PARAMS.model.num_embeddings

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A user of the ranking surfaces the SUM embeddings are served to.",
)

user_features_source = FileSource(
    name="user_features_source",
    # Every daily partition (the DuckDB offline store reads a glob; ds= comes from the folder names).
    path=str(_DATA / "users" / "*" / "*.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_ts",
    description="Daily user feature snapshots, data/users/ds=YYYY-MM-DD/*.parquet.",
)

user_features = FeatureView(
    name="user_features",
    entities=[user],
    ttl=timedelta(days=7),
    schema=[
        Field(name="sessions_7d", dtype=Float32, description="Sessions in the last 7 days (log1p)."),
        Field(name="avg_dwell_seconds", dtype=Float32, description="Mean dwell time per item (log1p)."),
        Field(name="account_age_days", dtype=Float32, description="Account age (log1p days)."),
        Field(name="ad_click_rate_30d", dtype=Float32, description="Smoothed ad click rate, 30 days."),
        Field(name="video_share", dtype=Float32, description="Share of video in consumption."),
        Field(name="interest_score_a", dtype=Float32, description="Profile score from a side model."),
        Field(name="interest_score_b", dtype=Float32, description="Profile score from a side model."),
        Field(name="interest_score_c", dtype=Float32, description="Profile score from a side model."),
        Field(
            name="liked_pages",
            dtype=Array(Int64),
            tags={"hash_size": "2000", "mean_length": "8"},
            description="Pages the user liked (recent first).",
        ),
        Field(
            name="clicked_ad_categories",
            dtype=Array(Int64),
            tags={"hash_size": "64", "mean_length": "4"},
            description="Ad categories clicked in the last 30 days.",
        ),
        Field(
            name="followed_topics",
            dtype=Array(Int64),
            tags={"hash_size": "500", "mean_length": "5"},
            description="Topics the user follows.",
        ),
    ],
    source=user_features_source,
    online=True,
    description="Raw user-side features: the user tower's inputs.",
)

# MovieLens-100K as the platform's real dataset (params profile `movielens`, sum_platform/movielens_days.py):
# a user's features on a day are computed from their ratings strictly before it.
movielens_user_features_source = FileSource(
    name="movielens_user_features_source",
    path=str(_DATA / "users" / "*" / "*.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_ts",
    description="Daily MovieLens user snapshots, data/users/ds=YYYY-MM-DD/*.parquet.",
)

movielens_user_features = FeatureView(
    name="movielens_user_features",
    entities=[user],
    ttl=timedelta(days=30),  # MovieLens users rate in bursts; a snapshot stays valid for a month
    schema=[
        Field(name="ml_age", dtype=Float32, description="Age from the profile (years)."),
        Field(name="ml_ratings_before", dtype=Float32, description="Ratings given before the day."),
        Field(name="ml_mean_rating_before", dtype=Float32, description="Mean rating given before the day (0: none)."),
        Field(name="ml_days_since_first", dtype=Float32, description="Days since the user's first rating."),
        Field(name="ml_recent_items", dtype=Array(Int64), tags={"hash_size": "1683"},
              description="The 20 latest rated movies, most recent first."),
        Field(name="ml_recent_genres", dtype=Array(Int64), tags={"hash_size": "19"},
              description="Genres of the 20 latest rated movies."),
        Field(name="ml_liked_items", dtype=Array(Int64), tags={"hash_size": "1683"},
              description="The 20 latest movies rated 4 or 5."),
        Field(name="ml_occupation", dtype=Array(Int64), tags={"hash_size": "21"}, description="Occupation id."),
        Field(name="ml_gender", dtype=Array(Int64), tags={"hash_size": "2"}, description="Gender id."),
    ],
    source=movielens_user_features_source,
    online=True,
    description="MovieLens user features: the user tower's inputs under the movielens profile.",
)

sum_embeddings_source = FileSource(
    name="sum_embeddings_source",
    # Every row the online store was given, as written (the daily batch and each SOAP write-back), so a
    # point-in-time retrieval returns what serving returned at that moment (sum_platform.offline_store).
    path=str(_DATA / "embeddings" / "*" / "*.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="written_at",
    description="The served SUM embeddings' write log, data/embeddings/ds=YYYY-MM-DD/*.parquet.",
)

sum_embeddings_push = PushSource(
    name="sum_embeddings_push",
    batch_source=sum_embeddings_source,
    description="Write-backs of freshly computed embeddings from the SOAP compute deployment.",
)

# One row per user holds the served (average-pooled) value and the raw versions it pools, each with the id of the
# snapshot that computed it (paper 5.2: the current computed embedding + the POOL_DEPTH - 1 most recent cached ones;
# the pooling rule and the fields are sum_platform/embedding_row.py's), so a writer can pool the next version from the
# row alone. Invariant kept by serving/store_io (the only writer):
#   embedding_k == fp16(mean of the non-empty slot values {slot}_embedding_k), slots latest first
# raw is the latest version (its snapshot_id / written_at_ms), prev1 the one before (prev1_snapshot_id), and so on;
# pooled_versions counts the non-empty ones. batch_* keep the daily batch's value (offline mode). Rows written before
# the prev*_snapshot_id fields (schema v1) are migrated on their next write or by `sumctl migrate-embeddings`.
# served_packed / batch_packed hold the same values again, packed into one field each, so a read is one online-store
# row and one decode instead of K + 3 (the unpacked fields stay what Feast clients and training read).
sum_embeddings = FeatureView(
    name="sum_embeddings",
    entities=[user],
    ttl=timedelta(days=30),
    schema=[
        Field(name=f"embedding_{k}", dtype=Array(Float32), description="Served value: the pooled versions.")
        for k in range(NUM_EMBEDDINGS)
    ]
    + [
        Field(name="snapshot_id", dtype=String, description="Snapshot that computed the latest version."),
        Field(name="written_at_ms", dtype=Int64, description="Write time of the latest version, Unix ms (UTC)."),
        Field(name="pooled_versions", dtype=Int64, description=f"Versions averaged into embedding_k (1-{POOL_DEPTH})."),
    ]
    + [
        Field(name=f"{VALUE_PREFIX[slot]}{k}", dtype=Array(Float32), description=f"Raw version ({slot}); empty if none.")
        for slot in SLOTS
        for k in range(NUM_EMBEDDINGS)
    ]
    + [
        Field(name=name, dtype=String, description=f"Snapshot that computed the {slot} version; empty if none.")
        for slot, name in zip(SLOTS[1:], SLOT_ID_FIELDS[1:])
    ]
    + [Field(name=name, dtype=Array(Float32)) for name in batch_fields(NUM_EMBEDDINGS)[:NUM_EMBEDDINGS]]
    + [
        Field(name="batch_snapshot_id", dtype=String, description="Snapshot of the last daily batch write."),
        Field(name="batch_written_at_ms", dtype=Int64, description="Time of the last daily batch write."),
    ]
    + [
        Field(name=name, dtype=Bytes,
              description=f"The {value} value, its snapshot id, write time and versions in one field: what SOAP "
                          "reads (sum_platform/embedding_row.py pack_value).")
        for value, name in PACKED_FIELDS.items()
    ],
    source=sum_embeddings_push,
    online=True,
    description="SUM user embeddings (fp16 values stored as float32 arrays), served by SOAP.",
)
