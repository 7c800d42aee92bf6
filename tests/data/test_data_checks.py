"""The data gate against good and corrupted partitions: real GX suites, real checkpoints, real Data Docs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from validation.data_checks import DataValidationError, ValidationReport, validate_day, validate_partition
from validation.suites import MAX_SPARSE_LEN, build_suite


def _validate(kind, df, tmp_path, ds, spec, params, gx_root, builder) -> ValidationReport:
    folder = builder.write_partition(df, tmp_path / kind / f"ds={ds}")
    return validate_partition(kind, ds, folder, spec, params, gx_root)


def _assert_fails(report: ValidationReport, *needles: str) -> None:
    """The report failed and one failed line contains every needle."""
    assert not report.success, report.summary()
    assert any(all(n in line for n in needles) for line in report.failed), (needles, report.failed)


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["events", "users"])
def test_suite_covers_the_contract(kind, spec, params):
    suite = build_suite(kind, spec, params)
    assert suite.name == f"sum_{kind}"
    types = {e.expectation_type for e in suite.expectations}
    assert {
        "expect_table_row_count_to_be_between",
        "expect_table_columns_to_match_set",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_in_type_list",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_unique",
        "expect_column_values_to_be_in_set",
    } <= types
    columns = {e.column for e in suite.expectations if hasattr(e, "column")}
    if kind == "events":
        assert {"impression_id", "user_id", "ad_id", "ad_quality", "click", "conversion"} <= columns
        assert "expect_column_pair_values_a_to_be_greater_than_b" in types
    else:
        assert set(spec.user_dense) <= columns
        assert {f"{name}__min_id" for name in spec.user_sparse} <= columns


def test_unknown_kind_is_rejected(spec, params):
    with pytest.raises(ValueError, match="unknown partition kind"):
        build_suite("clicks", spec, params)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Good partitions, Data Docs, rerun safety
# ---------------------------------------------------------------------------------------------
def test_good_day_passes_and_builds_data_docs(tmp_path, ds, spec, params, builder, caplog):
    builder.make_day(tmp_path, ds, spec)
    with caplog.at_level("INFO", logger="validation.data_checks"):
        reports = validate_day(ds, tmp_path, spec, params)
        reports_again = validate_day(ds, tmp_path, spec, params)  # rerun-safe: same ds, same project
    for report in reports + reports_again:
        assert report.success, report.summary()
        assert report.failed == []
        assert report.evaluated >= 15
    assert [r.kind for r in reports] == ["events", "users"]
    assert reports[0].rows == 500 and reports[1].rows == 100
    index = Path(reports[0].data_docs_index)
    assert index.name == "index.html" and index.is_file()
    assert index.is_relative_to(tmp_path / "gx")
    assert "sum_events" in index.read_text() or any((index.parent / "validations").rglob("*.html"))
    assert any("Data Docs" in rec.getMessage() and str(index) in rec.getMessage() for rec in caplog.records)
    json.dumps(reports[0].to_dict())  # serialisable for the run's validation.json


def test_without_data_docs_the_day_is_judged_the_same_and_no_site_is_built(tmp_path, ds, spec, params, builder):
    builder.make_day(tmp_path, ds, spec)
    reports = validate_day(ds, tmp_path, spec, params, data_docs=False)
    assert all(r.success and r.data_docs_index is None for r in reports)
    assert not list((tmp_path / "gx" / "uncommitted").rglob("*.html"))  # no page rendered
    with_docs = validate_day(ds, tmp_path, spec, params)
    assert [(r.kind, r.success, r.evaluated, r.failed) for r in with_docs] == \
        [(r.kind, r.success, r.evaluated, r.failed) for r in reports]
    assert Path(with_docs[0].data_docs_index).is_file()


def test_a_suite_page_is_rendered_again_only_when_its_suite_changed(tmp_path, ds, spec, params, builder):
    """Data Docs: the suite pages exist after the first run, a rerun with the same suites leaves them as they
    are, and a changed suite (written again by the next run) gets its page rendered again."""
    import os

    from validation.gx_project import suite_page_is_current

    builder.make_day(tmp_path, ds, spec)
    validate_day(ds, tmp_path, spec, params)
    gx_root = tmp_path / "gx"
    pages = gx_root / "uncommitted" / "data_docs" / "local_site" / "expectations"
    page = pages / "sum_events.html"
    assert page.is_file() and suite_page_is_current(gx_root, "sum_events")
    rendered = page.stat().st_mtime_ns
    validate_day(ds, tmp_path, spec, params)
    assert page.stat().st_mtime_ns == rendered  # the same suite: not rendered again
    suite = gx_root / "expectations" / "sum_events.json"
    os.utime(suite, ns=(rendered + 10**6, rendered + 10**6))  # as a changed contract rewrites it
    assert not suite_page_is_current(gx_root, "sum_events")
    validate_day(ds, tmp_path, spec, params)
    assert page.stat().st_mtime_ns > rendered and suite_page_is_current(gx_root, "sum_events")


def test_a_valid_day_at_scale_passes(tmp_path, ds, spec, params, builder):
    """10k events of 2k users pass every check (the speed is benchmarks/validation_bench.py's, not a test's)."""
    builder.make_day(tmp_path, ds, spec, n_events=10_000, n_users=2_000)
    reports = validate_day(ds, tmp_path, spec, params)
    assert [(r.kind, r.success, r.failed) for r in reports] == [("events", True, []), ("users", True, [])]
    assert {r.kind: r.rows for r in reports} == {"events": 10_000, "users": 2_000}


# ---------------------------------------------------------------------------------------------
# Corrupted events
# ---------------------------------------------------------------------------------------------
def test_null_user_id_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    events["user_id"] = events["user_id"].astype("Int64")
    events.loc[[3, 17], "user_id"] = pd.NA
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_column_values_to_not_be_null(user_id)", "2 of 500 values are null")


def test_click_value_2_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    events.loc[5, "click"] = 2
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_column_values_to_be_in_set(click)", "1 of 500 values not in [0, 1]", "e.g. 2")


def test_conversion_without_click_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    row = int(np.flatnonzero(events["click"].to_numpy() == 0)[0])
    events.loc[row, "conversion"] = 1
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_column_pair_values_a_to_be_greater_than_b(click, conversion)", "click < conversion")
    assert len(report.failed) == 1, report.failed


def test_ad_quality_out_of_range_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    events.loc[:11, "ad_quality"] = 1.5
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_column_values_to_be_between(ad_quality)", "12 of 500 values outside [0, 1]")


def test_event_ts_on_another_date_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    events.loc[0, "event_ts"] = events.loc[0, "event_ts"] - pd.Timedelta(days=1)
    events.loc[1, "event_ts"] = pd.Timestamp(ds, tz="UTC") + pd.Timedelta(days=1)  # end is exclusive
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "(event_ts__utc_date)", f"2 of 500 values not in ['{ds}']")


def test_event_ts_outside_utc_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    events["event_ts"] = events["event_ts"].dt.tz_localize(None)  # naive timestamps
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "(event_ts__type)", "not in ['timestamp[UTC]']")


def test_duplicate_impression_id_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    events.loc[10, "impression_id"] = events.loc[11, "impression_id"]
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_column_values_to_be_unique(impression_id)", "2 of 500 values are duplicated")


def test_ad_id_beyond_cardinality_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    events.loc[0, "ad_id"] = params.events.ad_sparse["ad_id"]
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_column_values_to_be_between(ad_id)", f"outside [0, {params.events.ad_sparse['ad_id']})")


def test_missing_column_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].drop(columns=["ad_price"])
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_table_columns_to_match_set", "missing required columns ['ad_price']")
    assert report.failed[0].startswith("expect_table_columns_to_match_set")  # reported first
    _assert_fails(report, "expect_column_values_to_not_be_null(ad_price)", "column 'ad_price' is missing")


def test_wrong_column_type_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].copy()
    events["ad_id"] = events["ad_id"].astype(str)
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_column_values_to_be_in_type_list(ad_id)")


def test_zero_row_partition_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    events = good_day[0].iloc[:0]
    report = _validate("events", events, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_table_row_count_to_be_between(table)", "observed 0 rows")


# ---------------------------------------------------------------------------------------------
# Corrupted users
# ---------------------------------------------------------------------------------------------
def test_negative_sparse_id_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    users = good_day[1].copy()
    name = next(iter(spec.user_sparse))
    users.at[7, name] = np.array([3, -4, 5], dtype=np.int64)
    report = _validate("users", users, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, f"expect_column_values_to_be_between({name}__min_id)", "1 of 100 values outside [0, inf)", "-4")


def test_null_sparse_list_and_nonfinite_dense_fail(tmp_path, ds, spec, params, gx_root, good_day, builder):
    users = good_day[1].copy()
    sparse, dense = next(iter(spec.user_sparse)), spec.user_dense[0]
    users.at[2, sparse] = None
    users.loc[3, dense] = np.inf
    users.loc[4, dense] = np.nan
    report = _validate("users", users, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, f"expect_column_values_to_not_be_null({sparse})", "1 of 100")
    _assert_fails(report, f"expect_column_values_to_be_between({dense})", "1 of 100")
    _assert_fails(report, f"expect_column_values_to_not_be_null({dense})", "1 of 100")


def test_duplicate_user_and_wrong_snapshot_time_fail(tmp_path, ds, spec, params, gx_root, good_day, builder):
    users = good_day[1].copy()
    users.loc[1, "user_id"] = users.loc[0, "user_id"]
    users.loc[5, "event_ts"] = users.loc[5, "event_ts"] + pd.Timedelta(hours=3)
    report = _validate("users", users, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, "expect_column_values_to_be_unique(user_id)", "2 of 100")
    _assert_fails(report, "(event_ts__utc)", "1 of 100", f"{ds}T03:00:00")


def test_overlong_sparse_list_fails(tmp_path, ds, spec, params, gx_root, good_day, builder):
    users = good_day[1].copy()
    name = next(iter(spec.user_sparse))
    users.at[0, name] = np.zeros(MAX_SPARSE_LEN + 1, dtype=np.int64)
    report = _validate("users", users, tmp_path, ds, spec, params, gx_root, builder)
    _assert_fails(report, f"expect_column_values_to_be_between({name}__len)", f"outside [0, {MAX_SPARSE_LEN}]")


# ---------------------------------------------------------------------------------------------
# Unreadable partitions
# ---------------------------------------------------------------------------------------------
def test_empty_partition_folder_fails(tmp_path, ds, spec, params, gx_root):
    folder = tmp_path / "events" / f"ds={ds}"
    folder.mkdir(parents=True)
    report = validate_partition("events", ds, folder, spec, params, gx_root)
    _assert_fails(report, "read_partition(events)", "no parquet files", str(folder))
    assert report.evaluated == 0


def test_missing_partition_folder_fails(tmp_path, ds, spec, params, gx_root):
    report = validate_partition("users", ds, tmp_path / "nope", spec, params, gx_root)
    _assert_fails(report, "read_partition(users)", "does not exist")


def test_unreadable_parquet_fails(tmp_path, ds, spec, params, gx_root):
    folder = tmp_path / "events" / f"ds={ds}"
    folder.mkdir(parents=True)
    (folder / "part-0.parquet").write_bytes(b"this is not parquet")
    report = validate_partition("events", ds, folder, spec, params, gx_root)
    _assert_fails(report, "read_partition(events)", "unreadable parquet file", "part-0.parquet")


# ---------------------------------------------------------------------------------------------
# The day gate
# ---------------------------------------------------------------------------------------------
def test_failing_day_raises_naming_every_failed_check(tmp_path, ds, spec, params, builder):
    events, users = builder.make_day(tmp_path, ds, spec)
    events.loc[0, "click"] = 2
    builder.write_partition(events, tmp_path / "data" / "events" / f"ds={ds}")
    (tmp_path / "data" / "users" / f"ds={ds}" / "part-0.parquet").unlink()

    with pytest.raises(DataValidationError) as info:
        validate_day(ds, tmp_path, spec, params)
    message = str(info.value)
    assert "2 partition(s)" in message
    assert "expect_column_values_to_be_in_set(click)" in message
    assert "read_partition(users)" in message and "no parquet files" in message
    assert "Data Docs:" in message
    # Data Docs were built before the run stopped.
    assert [r.success for r in info.value.reports] == [False, False]
    assert Path(info.value.reports[0].data_docs_index).is_file()


def test_contract_change_updates_the_stored_suite(tmp_path, ds, spec, params, gx_root, good_day, builder):
    """The stored checkpoint is reused only while the contract is unchanged: a new feature is checked."""
    import dataclasses

    wider = dataclasses.replace(spec, user_dense=(*spec.user_dense, "brand_new_feature"))
    users = good_day[1]
    assert _validate("users", users, tmp_path / "a", ds, spec, params, gx_root, builder).success
    report = _validate("users", users, tmp_path / "b", ds, wider, params, gx_root, builder)
    _assert_fails(report, "expect_table_columns_to_match_set", "['brand_new_feature']")
    assert _validate("users", users, tmp_path / "c", ds, spec, params, gx_root, builder).success
