"""The GX suites of the data gate: the date-independent contract suites and the trailing suites.

Contract suites (``sum_events``, ``sum_users``, :func:`build_suite`) check a partition on its own. They do
not depend on the date: the date checks read the suite parameters ``partition_date`` and
``partition_start`` (see :func:`suite_parameters`), supplied when the checkpoint runs. Two of their checks:
every ``events.user_id`` has a row in the day's users partition (helper ``user_id__without_user_row``,
filled by :func:`validation.data_checks.validate_day`), and sparse ids below the feature's hash size. The
model takes ids modulo the hash size, so a stray out-of-range id is harmless and only *warned* (GX severity
``warning``: listed in ``ValidationReport.warnings``, the day passes), but more than
``max_out_of_range_id_share`` of a feature's lists holding one means the upstream hashing no longer matches
the contract (every such id silently collides with an unrelated id), which *fails*. Columns outside the
contract are warned too (training ignores them). Several expectations are put on the derived helper columns
``<column>__<what>`` of :mod:`validation.frames`.

Relative checks against the trailing days
------------------------------------------
Each partition type also has a *trailing* suite (``sum_events_trailing``, ``sum_users_trailing``,
:func:`build_trailing_suite`) whose bounds come from the profiles of previously **validated** days (see
:mod:`validation.profiles`). Thresholds are in the ``validation`` section of ``params.yaml``:

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
* rare extreme values: every value of each drift column within the trailing validated days' robust range
  (``[q, 1 - q]`` quantiles, ``extreme_tail_quantile``, min/max over the days) widened by
  ``extreme_span_multiple`` x its width on both sides; more than ``extreme_max_share`` of the rows beyond it
  (default: any row) fails (``expect_column_values_to_be_between``, ``meta.check = extreme_values``). A tail of
  0.3 % at 1e12 moves no quantile bin enough for the KL check, and the contract's range only asks for finite;
* a partition whose content equals a trailing day's (a stuck upstream re-delivering yesterday's rows,
  possibly re-stamped with today's date): ``expect_column_values_to_not_be_in_set`` on the helper
  ``table__content_digest`` (a hash of the rows without their date-dependent columns), for the partition
  types listed in ``stuck_check_kinds``.

GX is imported inside the builders: importing this module stays cheap.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING, Literal

import numpy as np

from sum_models.spec import FeatureSpec

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuite

    from sum_platform.config import Params
    from validation.profiles import TrailingPlan

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

SUITE_PARAMETERS = ("partition_date", "partition_start")
#: Helper column holding the partition's content digest (see :func:`validation.frames.content_digest`).
CONTENT_DIGEST = "table__content_digest"
#: ``meta["check"]`` of the trailing suite's extreme-values expectations (their failure lines say so).
EXTREME_VALUES = "extreme_values"


def check_kind(kind: str) -> None:
    """Raises ``ValueError`` unless ``kind`` is ``events`` or ``users``."""
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
    check_kind(kind)
    ev = params.events
    if kind == "events":
        return [
            "impression_id", ev.user_id, ev.timestamp,
            *spec.ad_sparse, *spec.ad_dense, *spec.labels,
        ]
    return [ev.user_id, ev.timestamp, *spec.user_dense, *spec.user_sparse]


def helper_columns(kind: str, spec: FeatureSpec, params: "Params") -> list[str]:
    """The derived ``<column>__<what>`` columns :func:`validation.frames.batch_frame` adds to a partition of ``kind``."""
    check_kind(kind)
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

    check_kind(kind)
    user_id, ts = params.events.user_id, params.events.timestamp
    required = required_columns(kind, spec, params)
    exps: list = [
        gxe.ExpectTableRowCountToBeBetween(min_value=params.validation.min_event_rows if kind == "events" else 1),
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
        meta={"notes": f"SUM data contract of the {kind} partitions (validation/suites.py)"},
    )


def trailing_suite_name(kind: str) -> str:
    return f"sum_{kind}_trailing"


def drift_columns(kind: str, spec: FeatureSpec) -> list[str]:
    """Columns whose distribution is compared with the previous validated day (helper names for lists)."""
    check_kind(kind)
    if kind == "events":
        return list(spec.ad_dense)
    return [*spec.user_dense, *(f"{name}__len" for name in spec.user_sparse)]


def param_name(prefix: str, column: str) -> str:
    return f"{prefix}__{column}"


def build_trailing_suite(kind: Kind, spec: FeatureSpec, params: "Params", plan: "TrailingPlan") -> "ExpectationSuite":
    """Builds the suite of the checks relative to the trailing validated days (see the module docstring).

    The bounds are today's, from :func:`validation.profiles.trailing_plan`, written into the suite as constants (not suite
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

    check_kind(kind)
    cfg = params.validation
    values = plan.parameters
    exps: list = [gxe.ExpectTableRowCountToBeBetween(
        min_value=values["trailing_rows_min"], max_value=values["trailing_rows_max"])]
    for label in plan.labels:
        exps.append(gxe.ExpectColumnMeanToBeBetween(
            column=label,
            min_value=values[param_name("trailing_rate_min", label)],
            max_value=values[param_name("trailing_rate_max", label)],
        ))
    for column in plan.drift:
        threshold = cfg.sparse_length_max_kl if column.endswith("__len") else cfg.drift_max_kl
        exps.append(gxe.ExpectColumnKLDivergenceToBeLessThan(
            column=column, partition_object=values[param_name("previous_partition", column)], threshold=threshold))
    for column in plan.extreme:
        share = cfg.extreme_max_share
        exps.append(gxe.ExpectColumnValuesToBeBetween(
            column=column, min_value=values[param_name("extreme_min", column)],
            max_value=values[param_name("extreme_max", column)], mostly=1.0 - share if share > 0 else 1.0,
            meta={"check": EXTREME_VALUES}))
    if plan.stuck:
        exps.append(gxe.ExpectColumnValuesToNotBeInSet(
            column=CONTENT_DIGEST, value_set=values["trailing_content_digests"]))
    return gx.ExpectationSuite(
        name=trailing_suite_name(kind),
        expectations=exps,
        meta={"notes": f"SUM {kind} partitions against the validated days {plan.baseline['trailing_days']} "
                       f"(drift: against {plan.baseline['previous_day']}); validation/suites.py"},
    )
