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

The suites do not depend on the date: the date checks read the suite parameters ``partition_date`` and
``partition_start`` (see :func:`suite_parameters`), supplied when the checkpoint runs. The GX project is
rerun-safe (every object is added or updated by name) and guarded by a file lock, so concurrent runs on
one project do not interleave their writes of ``great_expectations.yml``.

GX is imported lazily: importing this module (e.g. while Airflow parses a DAG) stays cheap.
"""

from __future__ import annotations

import fcntl
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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


# ---------------------------------------------------------------------------------------------
# Reports and errors
# ---------------------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """Outcome of validating one partition.

    Attributes:
        kind: ``events`` or ``users``.
        ds: The logical date, ``YYYY-MM-DD``.
        success: True when every expectation passed.
        failed: One human-readable line per failed check, ``<expectation>(<column>): <observed problem>``.
        evaluated: Number of expectations evaluated (0 when the partition could not be read).
        data_docs_index: Path of the local Data Docs ``index.html`` (None if no docs were built).
        path: The partition folder.
        rows: Rows read (None when the partition could not be read).
    """

    kind: str
    ds: str
    success: bool
    failed: list[str] = field(default_factory=list)
    evaluated: int = 0
    data_docs_index: str | None = None
    path: str | None = None
    rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One header line plus one indented line per failed check."""
        head = (
            f"{self.kind} partition ds={self.ds}: "
            f"{'passed' if self.success else f'{len(self.failed)} failed check(s)'}"
            f" ({self.evaluated} expectations evaluated, rows={self.rows}, path={self.path})"
        )
        return "\n".join([head, *(f"  - {line}" for line in self.failed)])


class DataValidationError(Exception):
    """A partition failed its data checks; the message lists every failed check of every failing partition."""

    def __init__(self, reports: list[ValidationReport]):
        self.reports = list(reports)
        failing = [r for r in self.reports if not r.success]
        lines = [f"data validation failed for {len(failing)} partition(s):"]
        lines += [r.summary() for r in failing]
        docs = next((r.data_docs_index for r in self.reports if r.data_docs_index), None)
        if docs:
            lines.append(f"Data Docs: {docs}")
        super().__init__("\n".join(lines))


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


def build_suite(kind: Kind, spec: FeatureSpec, params: "Params") -> "ExpectationSuite":
    """Builds the GX expectation suite of a partition type (not yet saved to any context).

    Checks: required columns present, column types, no nulls, value ranges, labels in {0, 1}, unique
    ``impression_id`` (events) / ``user_id`` (users), ``event_ts`` inside the partition's date (events) or
    at its start (users) via the suite parameters of :func:`suite_parameters`, labels ordered as a funnel
    (``conversion <= click``), sparse id lists of bounded length with ids >= 0, and at least one row.

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
    exps: list = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectTableColumnsToMatchSet(column_set=required_columns(kind, spec, params), exact_match=False),
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

    return gx.ExpectationSuite(
        name=suite_name(kind),
        expectations=exps,
        meta={"notes": f"SUM data contract of the {kind} partitions (validation/data_checks.py)"},
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


def _list_stats(values: pd.Series) -> tuple[list[bool], list[float], list[float]]:
    is_list, lengths, mins = [], [], []
    for v in values:
        if isinstance(v, (list, tuple, np.ndarray)):
            arr = np.asarray(v)
            ok = arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer))
            is_list.append(bool(ok))
            lengths.append(float(len(arr)))
            mins.append(float(arr.min()) if ok and arr.size else math.nan)
        else:
            is_list.append(v is None or (isinstance(v, float) and math.isnan(v)))  # nulls: not-null check
            lengths.append(math.nan)
            mins.append(math.nan)
    return is_list, lengths, mins


def batch_frame(kind: str, df: pd.DataFrame, spec: FeatureSpec, params: "Params") -> pd.DataFrame:
    """The frame handed to GX: the partition plus the derived ``<column>__<what>`` helper columns.

    A helper is only derived when its source column exists (a missing column is reported by the schema
    check and by every expectation on it or on its helpers).
    """
    _check_kind(kind)
    out = df.copy()
    ts = params.events.timestamp
    if ts in df.columns:
        out[f"{ts}__type"] = _utc_type(df[ts])
        utc = _as_utc(df[ts])
        unparseable = utc.isna() & df[ts].notna()
        if kind == "events":
            helper = utc.dt.strftime("%Y-%m-%d")
        else:
            helper = utc.dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str.removesuffix(".000000")
        out[f"{ts}__utc_date" if kind == "events" else f"{ts}__utc"] = helper.mask(unparseable, "<unparseable>")
    if kind == "users":
        for name in spec.user_sparse:
            if name in df.columns:
                is_list, lengths, mins = _list_stats(df[name])
                out[f"{name}__is_id_list"] = is_list
                out[f"{name}__len"] = lengths
                out[f"{name}__min_id"] = mins
    return out


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


def _checkpoint(context, kind: str, spec: FeatureSpec, params: "Params"):
    """Adds or updates the datasource, asset, batch definition, suite, validation definition and checkpoint."""
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

    suite = build_suite(kind, spec, params)  # type: ignore[arg-type]
    fingerprint = _suite_fingerprint(suite)
    suite.meta["sum_fingerprint"] = fingerprint
    checkpoint_name = f"sum_{kind}_checkpoint"
    # Steady state: the stored objects already match this contract. Re-adding them is the slowest part of a
    # run (GX compares expectations pairwise when it updates a suite), so reuse them as they are.
    try:
        stored = context.checkpoints.get(checkpoint_name)
        stored_suite = stored.validation_definitions[0].suite
        if stored_suite.meta.get("sum_fingerprint") == fingerprint and stored.is_fresh().success:
            return stored
    except Exception:  # noqa: BLE001 - anything missing or stale: (re)build below
        pass

    suite = context.suites.add_or_update(suite)
    validation = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"sum_{kind}_partition", data=batch_definition, suite=suite)
    )
    return context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=checkpoint_name,
            validation_definitions=[validation],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
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


def describe_failure(result, columns: set[str]) -> str:
    """One readable line for a failed GX ``ExpectationValidationResult``."""
    cfg = result.expectation_config
    etype, kwargs = cfg.type, dict(cfg.kwargs)
    res = dict(result.result or {})
    head = f"{etype}({_target(kwargs)})"

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
        return f"{head}: missing required columns {mismatch.get('missing', [])}"
    if etype == "expect_table_row_count_to_be_between":
        return f"{head}: observed {res.get('observed_value')} rows, expected at least {kwargs.get('min_value')}"
    if "unexpected_count" not in res:  # aggregate expectations (column dtype checks)
        expected = kwargs.get("type_list") or kwargs.get("value_set")
        return f"{head}: observed {res.get('observed_value')!r}, expected one of {expected}"

    count = f"{res.get('unexpected_count')} of {res.get('element_count')} values"
    if etype == "expect_column_values_to_be_between":
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        close = ")" if kwargs.get("strict_max") or hi is None else "]"
        bounds = f"[{'-inf' if lo is None else _fmt(lo)}, {'inf' if hi is None else _fmt(hi)}{close}"
        problem = f"outside {bounds}"
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
    else:
        problem = "unexpected"
    return f"{head}: {count} {problem}{_examples(res)}"


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def validate_partition(
    kind: Kind, ds: str, path: Path, spec: FeatureSpec, params: "Params", gx_root: Path
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

    Returns:
        The :class:`ValidationReport`.
    """
    from great_expectations.core.run_identifier import RunIdentifier

    _check_kind(kind)
    ds = ds if isinstance(ds, str) else ds.isoformat()
    parameters = suite_parameters(ds)
    path, gx_root = Path(path), Path(gx_root)
    try:
        df = read_partition(path)
    except PartitionReadError as err:
        docs = gx_root / "uncommitted" / "data_docs" / DATA_DOCS_SITE / "index.html"
        return ValidationReport(
            kind=kind, ds=ds, success=False, failed=[f"read_partition({kind}): {err}"],
            evaluated=0, data_docs_index=str(docs) if docs.exists() else None, path=str(path),
        )
    frame = batch_frame(kind, df, spec, params)
    columns = set(frame.columns)

    with _project_lock(gx_root):
        context = _file_context(gx_root)
        checkpoint = _checkpoint(context, kind, spec, params)
        result = checkpoint.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            run_id=RunIdentifier(run_name=f"{kind}-{ds}"),
        )
        docs_index = _data_docs_index(context, gx_root)

    # GX returns results grouped by metric, not in suite order: report them in suite order.
    order = {e.id: i for i, e in enumerate(checkpoint.validation_definitions[0].suite.expectations)}
    failed: list[str] = []
    evaluated = 0
    for suite_result in result.run_results.values():
        evaluated += int(suite_result.statistics.get("evaluated_expectations", 0))
        bad = [r for r in suite_result.results if not r.success]
        bad.sort(key=lambda r: order.get(r.expectation_config.id, len(order)))
        failed += [describe_failure(r, columns) for r in bad]
    report = ValidationReport(
        kind=kind, ds=ds, success=bool(result.success) and not failed, failed=failed,
        evaluated=evaluated, data_docs_index=docs_index, path=str(path), rows=len(df),
    )
    logger.info(
        "GX checkpoint %s for ds=%s: %s (%d expectations, %d failed); Data Docs: %s",
        checkpoint.name, ds, "passed" if report.success else "FAILED", evaluated, len(failed), docs_index,
    )
    return report


def validate_day(ds: str, workspace_root: Path, spec: FeatureSpec, params: "Params") -> list[ValidationReport]:
    """Validates the events and users partitions of ``ds`` in the workspace; Data Docs under ``<ws>/gx``.

    Raises:
        DataValidationError: If any partition fails (after all partitions ran and Data Docs were built);
            the message lists every failed check, and ``err.reports`` holds the reports.
    """
    from sum_platform.workspace import Workspace

    ws = Workspace(Path(workspace_root))
    gx_root = ws.root / "gx"
    folders = {"events": ws.events_dir(ds), "users": ws.users_dir(ds)}
    reports = [validate_partition(kind, ds, folders[kind], spec, params, gx_root) for kind in KINDS]
    docs = next((r.data_docs_index for r in reports if r.data_docs_index), None)
    logger.info("Data Docs for ds=%s: %s", ds, docs)
    if not all(r.success for r in reports):
        err = DataValidationError(reports)
        logger.error("%s", err)
        raise err
    return reports
