"""Data gate of the daily pipeline: one Great Expectations (GX 1.x) suite per partition type.

Each day has two partitions (see :class:`sum_platform.workspace.Workspace`)::

    data/events/ds=YYYY-MM-DD/*.parquet   one row per ad impression
    data/users/ds=YYYY-MM-DD/*.parquet    one row per user (the user tower's raw features)

:func:`validate_partition` reads a partition, runs it through a real GX ``Checkpoint`` (a
``ValidationDefinition`` over a pandas dataframe asset, plus an ``UpdateDataDocsAction``) in a file-backed
GX project, and returns a :class:`ValidationReport` whose ``failed`` entries name the expectation, the
column and what was observed. :func:`validate_day` validates both partitions of a date and raises
:class:`DataValidationError` if any check fails, after Data Docs are built, so the run stops there.

GX works badly with pandas object columns holding arrays and with timezone-aware dtypes, so the frame
handed to GX carries derived helper columns, named ``<column>__<what>``, and some expectations are put on
those:

    ``event_ts__type``          ``timestamp[UTC]`` when ``event_ts`` is a UTC timestamp, else its dtype
    ``event_ts__utc_date``      the UTC calendar date of each event (must be the partition's ds)
    ``event_ts__utc``           the UTC instant of each user row (must be ds 00:00)
    ``<list>__is_id_list``      the value is a list of integer ids
    ``<list>__len``             the list length
    ``<list>__min_id``          the smallest id of the list (null for an empty list)
    ``<list>__max_id``          the largest id of the list (null for an empty list)
    ``user_id__without_user_row`` the event's user_id when the users partition has no row for it, else null
    ``table__content_digest``   one value per partition: a hash of its rows without date-dependent columns

The suites do not depend on the date: the date checks read the suite parameters ``partition_date`` and
``partition_start`` (see :func:`suite_parameters`), supplied when the checkpoint runs. The GX project is
rerun-safe (every object is added or updated by name) and guarded by a file lock, so concurrent runs on
one project do not interleave their writes of ``great_expectations.yml``.

Relative checks against the trailing days
------------------------------------------
Besides the contract suites (``sum_events``, ``sum_users``), each partition type has a *trailing* suite
(``sum_events_trailing``, ``sum_users_trailing``) whose bounds come from the profiles of previously
**validated** days of the workspace (``<ws>/runs/<ds>/data_profile.json``, written by :func:`validate_day`
only when both partitions of the day pass, and removed when a rerun of that day fails, so a bad day never
becomes a baseline). Thresholds are in the ``validation`` section of ``params.yaml``:

* row count within ``[row_count_min_ratio, row_count_max_ratio]`` x the median row count of the last
  ``trailing_days`` validated days (``expect_table_row_count_to_be_between``);
* per label, the label rate within ``label_rate_max_relative_change`` (relative) of the trailing mean
  rate (``expect_column_mean_to_be_between``);
* distribution drift of every dense user feature and ad feature, and of the length of every sparse id list,
  against the previous validated day: GX's ``expect_column_kl_divergence_to_be_less_than`` with the
  previous day's quantile partition (``drift_bins`` bins, open-ended outer bins) and threshold
  ``drift_max_kl`` / ``sparse_length_max_kl``. KL divergence of the binned distributions was chosen over a
  KS test because it is an effect size (a KS p-value at 30k rows rejects harmless daily drift, and GX's
  KS expectations are bootstrapped and slow), it is a built-in GX expectation evaluated by GX's own
  metrics (so it runs on Spark/SQL engines too and Data Docs chart observed against expected shares), and
  with quantile bins whose outer bins are open it is always finite and bounded by ~log(bins);
* a partition whose content equals a trailing day's (a stuck upstream re-delivering yesterday's rows,
  possibly re-stamped with today's date): ``expect_column_values_to_not_be_in_set`` on the helper
  ``table__content_digest`` (a hash of the rows without their date-dependent columns), for the partition
  types listed in ``stuck_check_kinds``.

With no validated day before ``ds`` (the first day) the trailing suites are not run and the report lists
them under ``skipped``. Two more contract checks: every ``events.user_id`` has a row in the day's users
partition (helper ``user_id__without_user_row``, filled by :func:`validate_day`), and sparse ids below the
feature's hash size. The model takes ids modulo the hash size, so a stray out-of-range id is harmless and
only *warned* (GX severity ``warning``: listed in ``ValidationReport.warnings``, the day passes), but more
than ``max_out_of_range_id_share`` of a feature's lists holding one means the upstream hashing no longer
matches the contract (every such id silently collides with an unrelated id), which *fails*. Columns
outside the contract are warned too (training ignores them).

GX is imported lazily: importing this module (e.g. while Airflow parses a DAG) stays cheap.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
import pandas as pd

from sum_models.spec import FeatureSpec

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuite

    from sum_platform.config import Params

logger = logging.getLogger(__name__)

Kind = Literal["events", "users"]
KINDS: tuple[str, ...] = ("events", "users")

#: Generous upper bound on a sparse id list's length (the simulator's mean lengths are single digits).
MAX_SPARSE_LEN = 4096
#: Dense user features must be finite float32 values.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Known bounds of ad-side dense features (``None`` = unbounded); others only need to be finite.
AD_DENSE_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "ad_quality": (0.0, 1.0),
    "ad_price": (0.0, None),
}
UTC_TIMESTAMP = "timestamp[UTC]"

INT64 = ["int64"]
ID_INTS = ["int64", "int32"]
LABEL_INTS = ["int8", "int16", "int32", "int64", "uint8"]
FLOATS = ["float32", "float64"]
STRINGS = ["str", "string", "StringDtype"]

DATASOURCE_NAME = "sum_partitions"
DATA_DOCS_SITE = "local_site"
#: Validation results listed on the Data Docs index (newest first; older result pages stay on disk).
DATA_DOCS_INDEX_LIMIT = 120
SUITE_PARAMETERS = ("partition_date", "partition_start")
#: Helper column holding the partition's content digest (see :func:`content_digest`).
CONTENT_DIGEST = "table__content_digest"
#: File (under ``<ws>/runs/<ds>/``) holding the profile of a validated day: the trailing checks' baseline.
PROFILE_FILE = "data_profile.json"
PROFILE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Reports and errors
# ---------------------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """Outcome of validating one partition.

    Attributes:
        kind: ``events`` or ``users``.
        ds: The logical date, ``YYYY-MM-DD``.
        success: True when every critical expectation passed (warnings do not fail a partition).
        failed: One human-readable line per failed check, ``<expectation>(<column>): <observed problem>``.
        evaluated: Number of expectations evaluated (0 when the partition could not be read).
        data_docs_index: Path of the local Data Docs ``index.html`` (None if no docs were built).
        path: The partition folder.
        rows: Rows read (None when the partition could not be read).
        warnings: Failed expectations of severity ``warning``, same format as ``failed``.
        skipped: Checks that were not run, with the reason (e.g. no validated day before ``ds``).
        baseline: The validated days the trailing checks compared against: ``previous_day`` (drift and
            content) and ``trailing_days`` (row count, label rates).
        observed: The statistics of the trailing checks (e.g. ``kl_divergence(ad_price)``, ``row_count``,
            ``label_rate(click)``), whether they passed or not.
    """

    kind: str
    ds: str
    success: bool
    failed: list[str] = field(default_factory=list)
    evaluated: int = 0
    data_docs_index: str | None = None
    path: str | None = None
    rows: int | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    observed: dict[str, float | None] = field(default_factory=dict)
    #: The partition's profile (the next days' baseline); not part of :meth:`to_dict`.
    profile: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    #: GX resources of this validation for Data Docs (result and suite identifiers); not in :meth:`to_dict`.
    docs_resources: list = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if f.name not in ("profile", "docs_resources")}

    def summary(self) -> str:
        """One header line plus one indented line per failed check (and per warning / skipped check)."""
        head = (
            f"{self.kind} partition ds={self.ds}: "
            f"{'passed' if self.success else f'{len(self.failed)} failed check(s)'}"
            f" ({self.evaluated} expectations evaluated, rows={self.rows}, path={self.path})"
        )
        lines = [head, *(f"  - {line}" for line in self.failed)]
        lines += [f"  ~ warning: {line}" for line in self.warnings]
        lines += [f"  ~ skipped: {line}" for line in self.skipped]
        return "\n".join(lines)


class DataValidationError(Exception):
    """A partition failed its data checks; the message lists every failed check of every failing partition.

    Attributes:
        reports: The reports of every validated partition of the day.
        quarantine: Where the day's partitions were moved (set by the caller that quarantined them).
    """

    def __init__(self, reports: list[ValidationReport]):
        self.reports = list(reports)
        self.quarantine: str | None = None
        failing = [r for r in self.reports if not r.success]
        lines = [f"data validation failed for {len(failing)} partition(s):"]
        lines += [r.summary() for r in failing]
        docs = next((r.data_docs_index for r in self.reports if r.data_docs_index), None)
        if docs:
            lines.append(f"Data Docs: {docs}")
        super().__init__("\n".join(lines))

    @property
    def failed_checks(self) -> dict[str, list[str]]:
        """``{kind: [failed check line, ...]}`` of the failing partitions."""
        return {r.kind: list(r.failed) for r in self.reports if not r.success}

    def set_quarantine(self, folder: str | Path) -> None:
        """Records where the partitions went; the message (what Airflow shows) says it too."""
        self.quarantine = str(folder)
        self.args = (f"{self.args[0]}\nQuarantined to: {folder}",)


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown partition kind {kind!r}; expected one of {KINDS}")


def suite_name(kind: str) -> str:
    return f"sum_{kind}"


def suite_parameters(ds: str | date) -> dict[str, list[str]]:
    """Date-dependent values the suites reference (GX suite parameters), for the partition of ``ds``."""
    ds = ds if isinstance(ds, str) else ds.isoformat()
    day = date.fromisoformat(ds).isoformat()  # validates the format
    return {"partition_date": [day], "partition_start": [f"{day}T00:00:00"]}


def required_columns(kind: str, spec: FeatureSpec, params: "Params") -> list[str]:
    """Columns the data contract requires in a partition of ``kind``."""
    _check_kind(kind)
    ev = params.events
    if kind == "events":
        return [
            "impression_id", ev.user_id, ev.timestamp,
            *spec.ad_sparse, *spec.ad_dense, *spec.labels,
        ]
    return [ev.user_id, ev.timestamp, *spec.user_dense, *spec.user_sparse]


def helper_columns(kind: str, spec: FeatureSpec, params: "Params") -> list[str]:
    """The derived ``<column>__<what>`` columns :func:`batch_frame` adds to a partition of ``kind``."""
    _check_kind(kind)
    ts, user_id = params.events.timestamp, params.events.user_id
    if kind == "events":
        return [f"{ts}__type", f"{ts}__utc_date", f"{user_id}__without_user_row", CONTENT_DIGEST]
    lists = [f"{name}__{what}" for name in spec.user_sparse for what in ("is_id_list", "len", "min_id", "max_id")]
    return [f"{ts}__type", f"{ts}__utc", *lists, CONTENT_DIGEST]


def build_suite(kind: Kind, spec: FeatureSpec, params: "Params") -> "ExpectationSuite":
    """Builds the GX expectation suite of a partition type (not yet saved to any context).

    Checks: required columns present, column types, no nulls, value ranges, labels in {0, 1}, unique
    ``impression_id`` (events) / ``user_id`` (users), ``event_ts`` inside the partition's date (events) or
    at its start (users) via the suite parameters of :func:`suite_parameters`, labels ordered as a funnel
    (``conversion <= click``), every event's user in the users partition, sparse id lists of bounded length
    with ids in ``[0, hash size)`` (out-of-range ids: a warning, and a failure above
    ``validation.max_out_of_range_id_share`` of the rows), and at least one row. Warnings (GX severity
    ``warning``): columns outside the contract, any out-of-range sparse id.

    Args:
        kind: ``events`` or ``users``.
        spec: The model's input spec (feature names, ad-side cardinalities, labels).
        params: Platform params (column names of the events contract).

    Returns:
        A ``great_expectations.ExpectationSuite`` named ``sum_<kind>``.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    _check_kind(kind)
    user_id, ts = params.events.user_id, params.events.timestamp
    required = required_columns(kind, spec, params)
    exps: list = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectTableColumnsToMatchSet(column_set=required, exact_match=False),
        # Unexpected columns are ignored by training: warn, do not fail (missing ones fail just above).
        gxe.ExpectTableColumnsToMatchSet(
            column_set=[*required, *helper_columns(kind, spec, params)], exact_match=True, severity="warning"),
    ]

    def not_null(col: str) -> None:
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column=col))

    def typed(col: str, types: list[str]) -> None:
        exps.append(gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=types))

    def between(col: str, lo: float | None = None, hi: float | None = None, strict_max: bool = False) -> None:
        exps.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=lo, max_value=hi, strict_max=strict_max))

    # user_id and event_ts are in both partitions.
    not_null(user_id)
    typed(user_id, INT64)
    between(user_id, 0)
    not_null(ts)
    exps.append(gxe.ExpectColumnValuesToBeInSet(column=f"{ts}__type", value_set=[UTC_TIMESTAMP]))

    if kind == "events":
        not_null("impression_id")
        typed("impression_id", STRINGS)
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="impression_id"))
        exps.append(gxe.ExpectColumnValuesToBeInSet(
            column=f"{ts}__utc_date", value_set={"$PARAMETER": "partition_date"}))
        for name, cardinality in spec.ad_sparse.items():
            not_null(name)
            typed(name, ID_INTS)
            between(name, 0, cardinality, strict_max=True)
        for name in spec.ad_dense:
            lo, hi = AD_DENSE_BOUNDS.get(name, (-FLOAT32_MAX, FLOAT32_MAX))
            not_null(name)
            typed(name, FLOATS)
            between(name, lo, FLOAT32_MAX if hi is None else hi)
        for name in spec.labels:
            not_null(name)
            typed(name, LABEL_INTS)
            exps.append(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=[0, 1]))
        # Labels are a funnel in head order: a later label (conversion) implies the earlier one (click).
        for earlier, later in zip(spec.labels, spec.labels[1:]):
            exps.append(gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A=earlier, column_B=later, or_equal=True))
        # Referential: every impression's user has a row in the day's users partition.
        exps.append(gxe.ExpectColumnValuesToBeNull(column=f"{user_id}__without_user_row"))
    else:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column=user_id))
        exps.append(gxe.ExpectColumnValuesToBeInSet(
            column=f"{ts}__utc", value_set={"$PARAMETER": "partition_start"}))
        for name in spec.user_dense:
            not_null(name)
            typed(name, FLOATS)
            between(name, -FLOAT32_MAX, FLOAT32_MAX)  # finite
        for name in spec.user_sparse:
            not_null(name)
            exps.append(gxe.ExpectColumnValuesToBeInSet(column=f"{name}__is_id_list", value_set=[True]))
            between(f"{name}__len", 0, MAX_SPARSE_LEN)
            between(f"{name}__min_id", 0)
            hash_size = spec.user_sparse[name]
            share = params.validation.max_out_of_range_id_share
            exps.append(gxe.ExpectColumnValuesToBeBetween(
                column=f"{name}__max_id", max_value=hash_size, strict_max=True, mostly=max(0.0, 1.0 - share)))
            exps.append(gxe.ExpectColumnValuesToBeBetween(
                column=f"{name}__max_id", max_value=hash_size, strict_max=True, severity="warning"))

    return gx.ExpectationSuite(
        name=suite_name(kind),
        expectations=exps,
        meta={"notes": f"SUM data contract of the {kind} partitions (validation/data_checks.py)"},
    )


def trailing_suite_name(kind: str) -> str:
    return f"sum_{kind}_trailing"


def drift_columns(kind: str, spec: FeatureSpec) -> list[str]:
    """Columns whose distribution is compared with the previous validated day (helper names for lists)."""
    _check_kind(kind)
    if kind == "events":
        return list(spec.ad_dense)
    return [*spec.user_dense, *(f"{name}__len" for name in spec.user_sparse)]


def _param_name(prefix: str, column: str) -> str:
    return f"{prefix}__{column}"


def build_trailing_suite(kind: Kind, spec: FeatureSpec, params: "Params", plan: "TrailingPlan") -> "ExpectationSuite":
    """Builds the suite of the checks relative to the trailing validated days (see the module docstring).

    The bounds are today's, from :func:`trailing_plan`, written into the suite as constants (not suite
    parameters): Data Docs then show each bound and chart the previous day's distribution next to today's.
    The suite therefore changes from day to day; the contract suite does not.

    Args:
        kind: ``events`` or ``users``.
        spec: The model's input spec.
        params: Platform params (``validation`` section).
        plan: The bounds (row count, label rates, previous day's partitions, trailing content digests).

    Returns:
        A ``great_expectations.ExpectationSuite`` named ``sum_<kind>_trailing``.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    _check_kind(kind)
    cfg = params.validation
    values = plan.parameters
    exps: list = [gxe.ExpectTableRowCountToBeBetween(
        min_value=values["trailing_rows_min"], max_value=values["trailing_rows_max"])]
    for label in plan.labels:
        exps.append(gxe.ExpectColumnMeanToBeBetween(
            column=label,
            min_value=values[_param_name("trailing_rate_min", label)],
            max_value=values[_param_name("trailing_rate_max", label)],
        ))
    for column in plan.drift:
        threshold = cfg.sparse_length_max_kl if column.endswith("__len") else cfg.drift_max_kl
        exps.append(gxe.ExpectColumnKLDivergenceToBeLessThan(
            column=column, partition_object=values[_param_name("previous_partition", column)], threshold=threshold))
    if plan.stuck:
        exps.append(gxe.ExpectColumnValuesToNotBeInSet(
            column=CONTENT_DIGEST, value_set=values["trailing_content_digests"]))
    return gx.ExpectationSuite(
        name=trailing_suite_name(kind),
        expectations=exps,
        meta={"notes": f"SUM {kind} partitions against the validated days {plan.baseline['trailing_days']} "
                       f"(drift: against {plan.baseline['previous_day']}); validation/data_checks.py"},
    )


# ---------------------------------------------------------------------------------------------
# Reading partitions and deriving helper columns
# ---------------------------------------------------------------------------------------------
class PartitionReadError(Exception):
    """The partition folder is missing, empty or unreadable."""


def read_partition(path: Path) -> pd.DataFrame:
    """Reads every ``*.parquet`` file of a partition folder (or a single parquet file) into one frame."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise PartitionReadError(f"partition folder {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.parquet") if p.is_file())
    if not files:
        raise PartitionReadError(f"no parquet files in partition folder {path}")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except Exception as err:  # noqa: BLE001 - any reader error means the file is unusable
            raise PartitionReadError(f"unreadable parquet file {f}: {type(err).__name__}: {err}") from err
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        return table.to_pandas()
    except Exception as err:  # noqa: BLE001
        raise PartitionReadError(f"parquet files of {path} do not combine: {type(err).__name__}: {err}") from err


def _utc_type(col: pd.Series) -> str:
    dtype = col.dtype
    if isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) in ("UTC", "utc", "Etc/UTC", "+00:00", "Z"):
        return UTC_TIMESTAMP
    return str(dtype)


def _as_utc(col: pd.Series) -> pd.Series:
    """The column as UTC timestamps (naive values are taken as UTC; unparseable values become NaT)."""
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return col.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(col.dtype):
        return col.dt.tz_localize("UTC")
    try:
        return pd.to_datetime(col, utc=True, errors="coerce")
    except (TypeError, ValueError, OverflowError):
        return pd.Series(pd.NaT, index=col.index, dtype="datetime64[ns, UTC]")


def _list_stats(values: pd.Series) -> tuple[list[bool], list[float], list[float], list[float]]:
    is_list, lengths, mins, maxs = [], [], [], []
    for v in values:
        if isinstance(v, (list, tuple, np.ndarray)):
            arr = np.asarray(v)
            ok = arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer))
            is_list.append(bool(ok))
            lengths.append(float(len(arr)))
            mins.append(float(arr.min()) if ok and arr.size else math.nan)
            maxs.append(float(arr.max()) if ok and arr.size else math.nan)
        else:
            is_list.append(v is None or (isinstance(v, float) and math.isnan(v)))  # nulls: not-null check
            lengths.append(math.nan)
            mins.append(math.nan)
            maxs.append(math.nan)
    return is_list, lengths, mins, maxs


def _hashable(col: pd.Series) -> pd.Series:
    """A column pandas can hash row by row (lists and arrays become their bytes' hex)."""
    if col.dtype != object:
        return col
    def one(v: Any) -> Any:
        if isinstance(v, (list, tuple, np.ndarray)):
            arr = np.asarray(v)
            return f"{arr.dtype.str}:{arr.tobytes().hex()}"
        return v if v is None or isinstance(v, (str, bytes)) else repr(v)
    return col.map(one)


def content_digest(kind: str, df: pd.DataFrame, params: "Params") -> str:
    """A hash of a partition's rows, independent of row order and of its date-dependent columns.

    ``event_ts`` and ``impression_id`` are left out, so a stuck upstream that re-delivers yesterday's rows
    re-stamped with today's date has yesterday's digest. Never raises: an unhashable partition gets a
    digest of its error (other checks report what is wrong with it).
    """
    _check_kind(kind)
    drop = {params.events.timestamp, "impression_id"}
    cols = sorted(c for c in df.columns if c not in drop and "__" not in c)
    try:
        frame = pd.DataFrame({c: _hashable(df[c]) for c in cols})
        rows = np.sort(pd.util.hash_pandas_object(frame, index=False).to_numpy()) if cols else np.array([])
        payload = json.dumps([kind, cols, len(df)]).encode() + rows.tobytes()
    except Exception as err:  # noqa: BLE001 - a malformed partition still gets a (unique-ish) digest
        payload = f"{kind}:unhashable:{type(err).__name__}:{err}:{len(df)}".encode()
    return hashlib.sha256(payload).hexdigest()[:20]


def batch_frame(
    kind: str, df: pd.DataFrame, spec: FeatureSpec, params: "Params", user_ids: np.ndarray | None = None,
) -> pd.DataFrame:
    """The frame handed to GX: the partition plus the derived ``<column>__<what>`` helper columns.

    A helper is only derived when its source column exists (a missing column is reported by the schema
    check and by every expectation on it or on its helpers).

    Args:
        kind: ``events`` or ``users``.
        df: The partition as read.
        spec: The model's input spec.
        params: Platform params.
        user_ids: The ``user_id`` values of the day's users partition, for the events' referential check;
            ``None`` leaves the helper empty (the check passes; :func:`validate_partition` reports it as
            skipped).
    """
    _check_kind(kind)
    out = df.copy()
    ts, uid = params.events.timestamp, params.events.user_id
    if ts in df.columns:
        out[f"{ts}__type"] = _utc_type(df[ts])
        utc = _as_utc(df[ts])
        unparseable = utc.isna() & df[ts].notna()
        if kind == "events":
            helper = utc.dt.strftime("%Y-%m-%d")
        else:
            helper = utc.dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str.removesuffix(".000000")
        out[f"{ts}__utc_date" if kind == "events" else f"{ts}__utc"] = helper.mask(unparseable, "<unparseable>")
    if kind == "events" and uid in df.columns:
        missing = pd.Series(pd.NA, index=df.index, dtype="object")
        if user_ids is not None:
            try:
                absent = ~df[uid].isin(pd.Index(user_ids)) & df[uid].notna()
            except (TypeError, ValueError):
                absent = df[uid].notna()
            missing = df[uid].astype("object").where(absent, None)
        out[f"{uid}__without_user_row"] = missing
    if kind == "users":
        for name in spec.user_sparse:
            if name in df.columns:
                is_list, lengths, mins, maxs = _list_stats(df[name])
                out[f"{name}__is_id_list"] = is_list
                out[f"{name}__len"] = lengths
                out[f"{name}__min_id"] = mins
                out[f"{name}__max_id"] = maxs
    out[CONTENT_DIGEST] = content_digest(kind, df, params)
    return out


# ---------------------------------------------------------------------------------------------
# Profiles of validated days (the trailing checks' baseline)
# ---------------------------------------------------------------------------------------------
def quantile_partition(values: Any, bins: int) -> dict[str, list[float]] | None:
    """The distribution of ``values`` as a GX partition object over its own quantile bins.

    Inner edges are the ``1/bins .. (bins-1)/bins`` quantiles (observed values, deduplicated); the outer
    bins are open (``-inf``, ``inf``), so a shifted distribution lands in them and KL stays finite. Bins are
    ``[a, b)`` like ``numpy.histogram`` (which GX uses to count today's values). A first bin left empty by
    a heavy minimum (e.g. many empty lists) is merged into the next one; every other bin holds its lower
    edge, so no expected weight is zero.

    Returns:
        ``{"bins": [-inf, e1, ..., inf], "weights": [...]}``, or None without finite values.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    inner = np.unique(np.quantile(x, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="inverted_cdf"))
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    counts, _ = np.histogram(x, edges)
    if counts[0] == 0 and len(edges) > 2:
        edges = np.delete(edges, 1)
        counts, _ = np.histogram(x, edges)
    weights = counts / counts.sum()
    return {"bins": [float(e) for e in edges], "weights": [float(w) for w in weights]}


def _json_partition(partition: dict | None) -> dict | None:
    """JSON has no infinities: store the inner edges only."""
    if partition is None:
        return None
    return {"inner_edges": partition["bins"][1:-1], "weights": partition["weights"]}


def _gx_partition(stored: dict) -> dict:
    return {"bins": [-math.inf, *stored["inner_edges"], math.inf], "weights": list(stored["weights"])}


def profile_partition(kind: str, frame: pd.DataFrame, spec: FeatureSpec, params: "Params") -> dict[str, Any]:
    """The small summary of a validated partition that later days are checked against.

    Args:
        kind: ``events`` or ``users``.
        frame: The batch frame (partition plus helper columns, see :func:`batch_frame`).
        spec: The model's input spec.
        params: Platform params.
    """
    _check_kind(kind)
    out: dict[str, Any] = {"rows": int(len(frame)), "content_digest": str(frame[CONTENT_DIGEST].iloc[0])
                           if CONTENT_DIGEST in frame.columns and len(frame) else None}
    if kind == "events":
        out["label_rates"] = {
            label: float(pd.to_numeric(frame[label], errors="coerce").mean())
            for label in spec.labels if label in frame.columns
        }
    bins = params.validation.drift_bins
    partitions = {}
    for column in drift_columns(kind, spec):
        if column in frame.columns:
            part = _json_partition(quantile_partition(pd.to_numeric(frame[column], errors="coerce"), bins))
            if part is not None:
                partitions[column] = part
    out["partitions"] = partitions
    return out


def profile_path(workspace_root: Path, ds: str) -> Path:
    from sum_platform.workspace import Workspace

    return Workspace(Path(workspace_root)).run_dir(ds) / PROFILE_FILE


def load_history(workspace_root: Path, ds: str, limit: int) -> list[dict[str, Any]]:
    """Profiles of the last ``limit`` validated days strictly before ``ds``, oldest first.

    Only days before ``ds`` count, so rerunning an old date sees the baseline its first run saw.
    """
    from sum_platform.workspace import Workspace

    runs = Workspace(Path(workspace_root)).root / "runs"
    found = []
    for path in runs.glob(f"*/{PROFILE_FILE}"):
        day = path.parent.name
        try:
            if date.fromisoformat(day) >= date.fromisoformat(ds):
                continue
            profile = json.loads(path.read_text())
        except (ValueError, OSError) as err:
            logger.warning("ignoring unreadable data profile %s: %s", path, err)
            continue
        if profile.get("version") == PROFILE_VERSION:
            found.append(profile)
    found.sort(key=lambda p: p["ds"])
    return found[-limit:] if limit > 0 else []


@dataclass
class TrailingPlan:
    """What the trailing suite of one partition checks today, and the suite parameters it needs."""

    drift: list[str]
    labels: list[str]
    stuck: bool
    parameters: dict[str, Any]
    notes: dict[str, str]
    baseline: dict[str, Any]
    skipped: list[str]


def trailing_plan(kind: str, history: list[dict[str, Any]], spec: FeatureSpec, params: "Params") -> TrailingPlan | None:
    """Bounds of the trailing checks of a ``kind`` partition from the validated days' profiles.

    Returns:
        None when there is no validated day to compare with (the trailing suite is skipped).
    """
    _check_kind(kind)
    cfg = params.validation
    days = [h for h in history if isinstance(h.get(kind), dict)]
    if not days:
        return None
    previous = days[-1]
    prev_kind = previous[kind]
    parameters: dict[str, Any] = {}
    notes: dict[str, str] = {}
    skipped: list[str] = []

    rows = [int(d[kind]["rows"]) for d in days]
    reference = float(np.median(rows))
    parameters["trailing_rows_min"] = int(math.ceil(reference * cfg.row_count_min_ratio))
    parameters["trailing_rows_max"] = int(math.floor(reference * cfg.row_count_max_ratio))
    notes["expect_table_row_count_to_be_between(table)"] = (
        f"trailing median {reference:g} rows over {len(days)} validated day(s) "
        f"x [{cfg.row_count_min_ratio:g}, {cfg.row_count_max_ratio:g}]")

    labels: list[str] = []
    if kind == "events":
        for label in spec.labels:
            rates = [d[kind].get("label_rates", {}).get(label) for d in days]
            rates = [r for r in rates if r is not None and math.isfinite(r)]
            if not rates:
                skipped.append(f"label rate of {label!r}: no validated day with that label")
                continue
            mean, tol = float(np.mean(rates)), cfg.label_rate_max_relative_change
            parameters[_param_name("trailing_rate_min", label)] = mean * (1.0 - tol)
            parameters[_param_name("trailing_rate_max", label)] = mean * (1.0 + tol)
            notes[f"expect_column_mean_to_be_between({label})"] = (
                f"trailing mean rate {mean:.4f} over {len(rates)} validated day(s) +/- {tol:.0%}")
            labels.append(label)

    drift: list[str] = []
    partitions = prev_kind.get("partitions", {})
    for column in drift_columns(kind, spec):
        stored = partitions.get(column)
        if stored is None:
            skipped.append(f"drift of {column!r}: no distribution on the previous validated day {previous['ds']}")
            continue
        parameters[_param_name("previous_partition", column)] = _gx_partition(stored)
        drift.append(column)

    stuck = kind in cfg.stuck_check_kinds
    if stuck:
        parameters["trailing_content_digests"] = [d[kind].get("content_digest") or "" for d in days]
        notes["digest_days"] = json.dumps({d[kind].get("content_digest"): d["ds"] for d in days})
    baseline = {"previous_day": previous["ds"], "trailing_days": [d["ds"] for d in days]}
    return TrailingPlan(drift, labels, stuck, parameters, notes, baseline, skipped)


# ---------------------------------------------------------------------------------------------
# GX project and checkpoint
# ---------------------------------------------------------------------------------------------
@contextmanager
def _project_lock(gx_root: Path) -> Iterator[None]:
    gx_root.mkdir(parents=True, exist_ok=True)
    with open(gx_root / ".sum_validation.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _file_context(gx_root: Path):
    """Opens (scaffolding on first use) the file-backed GX project whose config lives in ``gx_root``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", context_root_dir=str(gx_root))
    changed = False
    bars = context.variables.progress_bars
    if bars is None or bars.get("globally", True):  # no tqdm bars in task logs
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        changed = True
    # The index page is rebuilt on every run from *all* stored validation results unless capped.
    sites = dict(context.variables.data_docs_sites or {})
    index_builder = (sites.get(DATA_DOCS_SITE) or {}).get("site_index_builder")
    if isinstance(index_builder, dict) and "validation_results_limit" not in index_builder:
        index_builder["validation_results_limit"] = DATA_DOCS_INDEX_LIMIT
        context.variables.data_docs_sites = sites
        changed = True
    if changed:
        context.variables.save()
    return context


def _checkpoint(context, kind: str, spec: FeatureSpec, params: "Params", plan: TrailingPlan | None = None):
    """Adds or updates the datasource, asset, batch definition, suites, validation definitions and checkpoint.

    Without a plan the checkpoint ``sum_<kind>_checkpoint`` runs the contract suite; with one,
    ``sum_<kind>_trailing_checkpoint`` runs the contract suite and the trailing suite on the same batch
    (one checkpoint run). Data Docs are updated by :func:`build_docs` afterwards.
    """
    import great_expectations as gx

    try:
        source = context.data_sources.get(DATASOURCE_NAME)
    except (KeyError, ValueError, LookupError, gx.exceptions.DataContextError):
        source = context.data_sources.add_pandas(DATASOURCE_NAME)
    try:
        asset = source.get_asset(kind)
    except LookupError:
        asset = source.add_dataframe_asset(kind)
    batch_name = f"{kind}_partition"
    try:
        batch_definition = asset.get_batch_definition(batch_name)
    except (KeyError, LookupError):
        batch_definition = asset.add_batch_definition_whole_dataframe(batch_name)

    suites = [(f"sum_{kind}_partition", build_suite(kind, spec, params))]  # type: ignore[arg-type]
    if plan is not None:
        suites.append((f"sum_{kind}_trailing", build_trailing_suite(kind, spec, params, plan)))  # type: ignore[arg-type]
    for _, suite in suites:
        suite.meta["sum_fingerprint"] = _suite_fingerprint(suite)
    checkpoint_name = f"sum_{kind}_checkpoint" if plan is None else f"sum_{kind}_trailing_checkpoint"
    prints = [suite.meta["sum_fingerprint"] for _, suite in suites]

    def current(vd) -> bool:
        return vd.suite.meta.get("sum_fingerprint") in prints and bool(vd.is_fresh().success)

    # Steady state: the stored objects already match. Re-adding them is the slowest part of a run (GX
    # compares expectations pairwise when it updates a suite), so reuse them as they are; the trailing
    # suite changes from day to day, so then only it is replaced.
    try:
        stored = context.checkpoints.get(checkpoint_name)
        if not stored.actions and [vd.suite.meta.get("sum_fingerprint") for vd in stored.validation_definitions] == prints and all(
                current(vd) for vd in stored.validation_definitions) and stored.is_fresh().success:
            return stored
    except Exception:  # noqa: BLE001 - anything missing or stale: (re)build below
        pass

    validations = []
    for (vd_name, suite), fingerprint in zip(suites, prints):
        try:  # the contract validation is shared by both checkpoints of the kind
            kept = context.validation_definitions.get(vd_name)
            if kept.suite.meta.get("sum_fingerprint") == fingerprint and kept.is_fresh().success:
                validations.append(kept)
                continue
        except Exception:  # noqa: BLE001
            pass
        suite = context.suites.add_or_update(suite)
        validations.append(context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=vd_name, data=batch_definition, suite=suite)))
    return context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=checkpoint_name,
            validation_definitions=validations,
            # No UpdateDataDocsAction: it rebuilds the site (index included) once per validation result;
            # build_docs() does it once for all the results of a day.
            actions=[],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5},
        )
    )


def _suite_fingerprint(suite) -> str:
    """A hash of a suite's expectations (types and arguments), independent of GX-assigned ids."""
    import hashlib
    import json

    configs = []
    for expectation in suite.expectations:
        config = expectation.configuration.to_json_dict()
        config.pop("id", None)
        configs.append(config)
    payload = json.dumps([suite.name, configs], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _data_docs_index(context, gx_root: Path) -> str | None:
    for site in context.get_docs_sites_urls() or []:
        url = site.get("site_url") or ""
        if url.startswith("file://"):
            return url.removeprefix("file://")
    index = gx_root / "uncommitted" / "data_docs" / DATA_DOCS_SITE / "index.html"
    return str(index) if index.exists() else None


def build_docs(gx_root: Path, resources: list) -> str | None:
    """Updates the local Data Docs with the given validation results (and suites) in one site build.

    Args:
        gx_root: The GX project.
        resources: GX resource identifiers (``ValidationResultIdentifier``, ``ExpectationSuiteIdentifier``).

    Returns:
        The path of the Data Docs ``index.html``.
    """
    with _project_lock(gx_root):
        context = _file_context(gx_root)
        if resources:
            context.build_data_docs(resource_identifiers=list(resources), build_index=True)
        return _data_docs_index(context, gx_root)


# ---------------------------------------------------------------------------------------------
# Failure messages
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float) and abs(value) >= 1e15:
        return f"{value:.3g}"
    if isinstance(value, np.generic):
        return _fmt(value.item())
    if isinstance(value, np.ndarray):
        return repr(value.tolist())
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return repr(value)


def _examples(result: dict) -> str:
    values = result.get("partial_unexpected_list") or []
    if not values:
        return ""
    return "; e.g. " + ", ".join(_fmt(v) for v in values[:3])


def _target(kwargs: dict) -> str:
    if "column" in kwargs:
        return kwargs["column"]
    if "column_A" in kwargs:
        return f"{kwargs['column_A']}, {kwargs['column_B']}"
    return "table"


def _num(value: Any) -> str:
    if value is None:
        return "None"
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3g}"


def _largest_shift(details: dict) -> str:
    """The bin whose share moved most, from the KL expectation's observed/expected partitions."""
    try:
        obs, exp = details["observed_partition"], details["expected_partition"]
        edges = [-math.inf, *obs["bins"], math.inf]
        o = [obs["tail_weights"][0], *obs["weights"], obs["tail_weights"][1]]
        e = [exp["tail_weights"][0], *exp["weights"], exp["tail_weights"][1]]
        if len(o) != len(edges) - 1:  # partitions with finite ends: no tails in the weights
            edges, o, e = list(obs["bins"]), list(obs["weights"]), list(exp["weights"])
        i = int(np.argmax(np.abs(np.asarray(o) - np.asarray(e))))
        return (f"; largest change: bin [{_num(edges[i])}, {_num(edges[i + 1])}) holds {o[i]:.1%} of values "
                f"vs {e[i]:.1%} on the previous day")
    except (KeyError, IndexError, TypeError, ValueError):
        return ""


def describe_failure(result, columns: set[str], notes: dict[str, str] | None = None) -> str:
    """One readable line for a failed GX ``ExpectationValidationResult``.

    Args:
        result: The failed result.
        columns: Columns of the validated frame (to say which missing column stopped an expectation).
        notes: Context of the trailing checks (their baseline), keyed by ``<expectation>(<target>)``.
    """
    notes = notes or {}
    cfg = result.expectation_config
    etype, kwargs = cfg.type, dict(cfg.kwargs)
    res = dict(result.result or {})
    head = f"{etype}({_target(kwargs)})"
    note = notes.get(head)

    missing = [c for c in (kwargs.get("column"), kwargs.get("column_A"), kwargs.get("column_B")) if c and c not in columns]
    if missing:
        source = missing[0].split("__")[0]
        extra = f" (derived from {source!r}, which is missing)" if "__" in missing[0] and source not in columns else ""
        return f"{head}: not evaluated, column {missing[0]!r} is missing{extra}"
    exc = result.exception_info or {}
    if isinstance(exc, dict):
        # Either {"raised_exception": bool, "exception_message": ...} or {metric id: {...}, ...}.
        if "raised_exception" in exc:
            msgs = [exc.get("exception_message")] if exc.get("raised_exception") else []
        else:
            msgs = [v.get("exception_message") for v in exc.values() if isinstance(v, dict)]
        msgs = [m for m in msgs if m]
        if msgs:
            return f"{head}: not evaluated, raised {str(msgs[0]).strip().splitlines()[-1]}"

    if etype == "expect_table_columns_to_match_set":
        mismatch = (res.get("details") or {}).get("mismatched") or {}
        if kwargs.get("exact_match", True):  # GX leaves the default (True) out of the kwargs
            return f"{head}: unexpected columns {sorted(mismatch.get('unexpected', []))} (ignored by training)"
        return f"{head}: missing required columns {mismatch.get('missing', [])}"
    if etype == "expect_table_row_count_to_be_between":
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        expected = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        context = f" ({note})" if note and hi is not None else ""
        return f"{head}: observed {res.get('observed_value')} rows, expected {expected}{context}"
    if etype == "expect_column_mean_to_be_between":
        context = f"; {note}" if note else ""
        observed = res.get("observed_value")
        value = "not computable (no rows)" if observed is None else _num(observed)
        return (f"{head}: label rate {value} outside "
                f"[{_num(kwargs.get('min_value'))}, {_num(kwargs.get('max_value'))}]{context}")
    if etype == "expect_column_kl_divergence_to_be_less_than":
        observed = res.get("observed_value")
        finite = observed is not None and math.isfinite(float(observed))
        value = f"{float(observed):.4g}" if finite else "not computable (no values)"
        baseline = notes.get("previous_day")
        against = f" vs the previous validated day {baseline}" if baseline else ""
        shift = _largest_shift(res.get("details") or {}) if finite else ""
        return (f"{head}: distribution drift of {kwargs.get('column')!r}: KL divergence {value}{against} "
                f"> {kwargs.get('threshold')}{shift}")
    if etype == "expect_column_values_to_not_be_in_set" and kwargs.get("column") == CONTENT_DIGEST:
        digest = next(iter(res.get("partial_unexpected_list") or []), None)
        days = json.loads(notes.get("digest_days", "{}"))
        return (f"{head}: partition content identical to the validated partition of "
                f"{days.get(digest, 'a trailing day')} (digest {digest}): a stuck or re-delivered day")
    if etype == "expect_column_values_to_be_null" and str(kwargs.get("column", "")).endswith("__without_user_row"):
        return (f"{head}: {res.get('unexpected_count')} of {res.get('element_count')} impressions have a "
                f"user_id with no row in the users partition{_examples(res)}")
    if "unexpected_count" not in res:  # aggregate expectations (column dtype checks)
        expected = kwargs.get("type_list") or kwargs.get("value_set")
        return f"{head}: observed {res.get('observed_value')!r}, expected one of {expected}"

    count = f"{res.get('unexpected_count')} of {res.get('element_count')} values"
    if etype == "expect_column_values_to_be_between":
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        close = ")" if kwargs.get("strict_max") or hi is None else "]"
        bounds = f"[{'-inf' if lo is None else _fmt(lo)}, {'inf' if hi is None else _fmt(hi)}{close}"
        problem = f"outside {bounds}"
        mostly = kwargs.get("mostly")
        if mostly is not None and mostly < 1:
            problem += f" (more than {1 - mostly:.2%} of the rows)"
    elif etype == "expect_column_values_to_not_be_null":
        return f"{head}: {count} are null"
    elif etype == "expect_column_values_to_be_in_set":
        problem = f"not in {kwargs.get('value_set')}"
    elif etype == "expect_column_values_to_be_unique":
        problem = "are duplicated"
    elif etype == "expect_column_pair_values_a_to_be_greater_than_b":
        op = "<" if kwargs.get("or_equal") else "<="
        problem = f"have {kwargs['column_A']} {op} {kwargs['column_B']}"
        count = f"{res.get('unexpected_count')} of {res.get('element_count')} rows"
    elif etype == "expect_column_values_to_be_in_type_list":
        problem = f"not of type {kwargs.get('type_list')}"
    elif etype == "expect_column_values_to_not_be_in_set":
        problem = f"in {kwargs.get('value_set')}"
    else:
        problem = "unexpected"
    return f"{head}: {count} {problem}{_examples(res)}"


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def validate_partition(
    kind: Kind, ds: str, path: Path, spec: FeatureSpec, params: "Params", gx_root: Path,
    history: list[dict[str, Any]] | None = None, user_ids: np.ndarray | None = None,
    build_data_docs: bool = True,
) -> ValidationReport:
    """Validates one partition with its GX checkpoint and updates the Data Docs.

    Never raises for bad data: a missing folder, a folder without parquet files or an unreadable file
    gives a failed report naming the problem.

    Args:
        kind: ``events`` or ``users``.
        ds: The partition's logical date, ``YYYY-MM-DD``.
        path: The partition folder (``data/<kind>/ds=<ds>``) or a parquet file.
        spec: The model's input spec.
        params: Platform params.
        gx_root: The GX project directory (holds ``great_expectations.yml``); created if needed.
        history: Profiles of the validated days before ``ds`` (see :func:`load_history`), oldest first;
            empty or None: the trailing checks are skipped (and listed in ``report.skipped``).
        user_ids: The day's ``users.user_id`` values for the events' referential check (None: skipped).
        build_data_docs: Update the Data Docs now (False: the caller passes ``report.docs_resources`` to
            :func:`build_docs`, as :func:`validate_day` does once for both partitions).

    Returns:
        The :class:`ValidationReport`; ``report.profile`` holds the partition's profile.
    """
    from great_expectations.core.run_identifier import RunIdentifier

    _check_kind(kind)
    ds = ds if isinstance(ds, str) else ds.isoformat()
    parameters: dict[str, Any] = dict(suite_parameters(ds))
    path, gx_root = Path(path), Path(gx_root)
    try:
        df = read_partition(path)
    except PartitionReadError as err:
        docs = gx_root / "uncommitted" / "data_docs" / DATA_DOCS_SITE / "index.html"
        return ValidationReport(
            kind=kind, ds=ds, success=False, failed=[f"read_partition({kind}): {err}"],
            evaluated=0, data_docs_index=str(docs) if docs.exists() else None, path=str(path),
        )
    frame = batch_frame(kind, df, spec, params, user_ids=user_ids)
    columns = set(frame.columns)
    skipped: list[str] = []
    if kind == "events" and user_ids is None:
        skipped.append("referential check (every user_id has a users row): no users partition given")
    plan = trailing_plan(kind, history or [], spec, params)
    if plan is None:
        skipped.append("trailing checks (row count, label rates, drift vs the previous day, stuck content): "
                       f"no validated day before {ds}")
        notes: dict[str, str] = {}
    else:
        skipped += plan.skipped
        notes = dict(plan.notes) | {"previous_day": plan.baseline["previous_day"]}

    with _project_lock(gx_root):
        context = _file_context(gx_root)
        checkpoint = _checkpoint(context, kind, spec, params, plan)
        result = checkpoint.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            run_id=RunIdentifier(run_name=f"{kind}-{ds}"),
        )
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    resources: list = list(result.run_results)
    resources += [ExpectationSuiteIdentifier(name=r.suite_name) for r in result.run_results.values()]
    docs_index = build_docs(gx_root, resources) if build_data_docs else None

    # GX returns results grouped by metric, not in suite order: report them in suite order.
    order: dict[str, int] = {}
    for vd in checkpoint.validation_definitions:
        for e in vd.suite.expectations:
            order[e.id] = len(order)
    failed: list[str] = []
    warnings: list[str] = []
    observed: dict[str, float | None] = {}
    evaluated = 0
    trailing_name = trailing_suite_name(kind)
    for suite_result in result.run_results.values():
        evaluated += int(suite_result.statistics.get("evaluated_expectations", 0))
        if suite_result.suite_name == trailing_name:
            for r in suite_result.results:
                key = _observed_key(r.expectation_config)
                value = (r.result or {}).get("observed_value")
                if key.startswith("content_repeated"):  # a map expectation: no observed value of its own
                    value = float(bool((r.result or {}).get("unexpected_count")))
                observed[key] = None if value is None or isinstance(value, (list, dict)) else float(value)
        bad = [r for r in suite_result.results if not r.success]
        bad.sort(key=lambda r: order.get(r.expectation_config.id, len(order)))
        for r in bad:
            line = describe_failure(r, columns, notes)
            if str(getattr(r.expectation_config, "severity", "critical")).lower().endswith("warning"):
                if "unexpected columns []" not in line:  # only missing columns: already a failure
                    warnings.append(line)
            else:
                failed.append(line)
    report = ValidationReport(
        kind=kind, ds=ds, success=not failed, failed=failed,
        evaluated=evaluated, data_docs_index=docs_index, path=str(path), rows=len(df),
        warnings=warnings, skipped=skipped, baseline=plan.baseline if plan else {}, observed=observed,
        profile=profile_partition(kind, frame, spec, params), docs_resources=resources,
    )
    logger.info(
        "GX checkpoint %s for ds=%s: %s (%d expectations, %d failed, %d warnings, %d skipped); Data Docs: %s",
        checkpoint.name, ds, "passed" if report.success else "FAILED", evaluated, len(failed), len(warnings),
        len(skipped), docs_index,
    )
    for line in warnings:
        logger.warning("%s partition ds=%s: %s", kind, ds, line)
    return report


def _observed_key(cfg) -> str:
    kwargs = cfg.kwargs
    names = {
        "expect_table_row_count_to_be_between": "row_count",
        "expect_column_mean_to_be_between": "label_rate",
        "expect_column_kl_divergence_to_be_less_than": "kl_divergence",
        "expect_column_values_to_not_be_in_set": "content_repeated",
    }
    name = names.get(cfg.type, cfg.type)
    return name if "column" not in kwargs else f"{name}({kwargs['column']})"


def _user_ids(path: Path, params: "Params") -> np.ndarray | None:
    """The users partition's ``user_id`` values, or None when they cannot be read."""
    import pyarrow.parquet as pq

    try:
        files = sorted(p for p in Path(path).glob("*.parquet") if p.is_file())
        if not files:
            return None
        column = params.events.user_id
        return np.concatenate([pq.read_table(f, columns=[column]).column(column).to_numpy() for f in files])
    except Exception:  # noqa: BLE001 - unreadable or without user_id: the users report says why
        return None


def validate_day(
    ds: str, workspace_root: Path, spec: FeatureSpec, params: "Params", gx_root: Path | None = None,
) -> list[ValidationReport]:
    """Validates the events and users partitions of ``ds`` in the workspace; Data Docs under ``<ws>/gx``.

    The trailing checks compare with the profiles of the validated days before ``ds``
    (``<ws>/runs/<day>/data_profile.json``). When both partitions pass, the day's profile is written (it
    becomes a baseline of the next days); when any fails, a profile left by an earlier passing run of the
    same date is removed, so a bad day is never a baseline.

    Args:
        ds: The logical date.
        workspace_root: The workspace (partitions under ``data/``, profiles under ``runs/``).
        spec: The model's input spec.
        params: Platform params.
        gx_root: The GX project (default ``<workspace_root>/gx``).

    Raises:
        DataValidationError: If any partition fails (after all partitions ran and Data Docs were built);
            the message lists every failed check, and ``err.reports`` holds the reports.
    """
    from sum_platform.workspace import Workspace

    ws = Workspace(Path(workspace_root))
    gx_root = Path(gx_root) if gx_root is not None else ws.gx_dir
    folders = {"events": ws.events_dir(ds), "users": ws.users_dir(ds)}
    history = load_history(ws.root, ds, params.validation.trailing_days)
    user_ids = _user_ids(folders["users"], params)
    reports = [
        validate_partition(kind, ds, folders[kind], spec, params, gx_root, history=history,  # type: ignore[arg-type]
                           user_ids=user_ids if kind == "events" else None, build_data_docs=False)
        for kind in KINDS
    ]
    docs = build_docs(gx_root, [res for r in reports for res in r.docs_resources])  # one site build
    for report in reports:
        report.data_docs_index = docs
    logger.info("Data Docs for ds=%s: %s", ds, docs)
    profile = profile_path(ws.root, ds)
    if not all(r.success for r in reports):
        if profile.exists():
            profile.unlink()
            logger.warning("ds=%s failed validation: removed its earlier profile %s (no longer a baseline)", ds, profile)
        err = DataValidationError(reports)
        logger.error("%s", err)
        raise err
    payload = {"version": PROFILE_VERSION, "ds": ds, **{r.kind: r.profile for r in reports}}
    profile.parent.mkdir(parents=True, exist_ok=True)
    tmp = profile.with_name(f".{profile.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(profile)
    return reports
