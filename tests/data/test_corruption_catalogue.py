"""Every kind of the bad-input catalogue (validation/corruptions.py) through real GX checkpoints.

The Data Docs site is not rebuilt per kind (rendering is ~40% of a validation; tests/data/test_data_checks.py
covers the docs of a failed partition).

The corrupted day is the first simulated day after a validated history (see the ``history`` fixture), so
the trailing checks (row count, label rates, drift, stuck content) are armed. Each failing kind must raise
``DataValidationError`` with a line naming its check; each warning kind must pass with that warning.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from validation.corruptions import CATALOGUE, CorruptionContext, failing_kinds, warning_kinds
from validation.data_checks import DataValidationError, validate_day
from validation.profiles import profile_path
from validation.suites import KINDS


def test_catalogue_has_at_least_15_distinct_failing_kinds(spec):
    kinds = failing_kinds()
    assert len(kinds) >= 15, kinds
    assert len(set(kinds)) == len(kinds)
    checks = {CATALOGUE[k].expected_check(spec) for k in kinds}
    assert len(checks) >= 12, checks  # distinct checks, not one check caught 15 ways
    for name, c in CATALOGUE.items():
        assert c.name == name and c.description and c.partition in KINDS and c.outcome in ("fail", "warn")
    assert set(warning_kinds()) == {"extra_column", "stray_id_beyond_hash_size"}
    assert set(failing_kinds(with_history=False)) < set(kinds)


def _deep_copy(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy that shares no cell with ``frame`` (``DataFrame.copy`` shares the arrays of list columns)."""
    out = frame.copy()
    for column in out.columns[out.dtypes == object]:
        out[column] = frame[column].map(copy.deepcopy)
    return out


def test_corruptions_leave_their_inputs_untouched(spec, sim_day, history):
    events, users = sim_day(history.next_ds)
    previous = sim_day(history.days[-1])
    ctx = CorruptionContext(history.next_ds, spec, previous)
    inputs = (events, users, *previous)
    before = [_deep_copy(frame) for frame in inputs]
    for name, corruption in CATALOGUE.items():
        bad_events, bad_users = corruption.apply(events, users, ctx)
        for frame, original in zip(inputs, before):  # today's and the previous day's frames, lists included
            pd.testing.assert_frame_equal(frame, original, obj=f"{name}: input frame")
        assert (bad_events is not events) and (bad_users is not users), name


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_each_corruption_is_caught_naming_its_check(name, spec, params, sim_day, history, workspace_with_history, builder):
    corruption = CATALOGUE[name]
    ds, root = history.next_ds, workspace_with_history
    events, users = sim_day(ds)
    ctx = CorruptionContext(ds, spec, previous=sim_day(history.days[-1]), seed=1)
    events, users = corruption.apply(events, users, ctx)
    builder.write_partition(events, root / "data" / "events" / f"ds={ds}")
    builder.write_partition(users, root / "data" / "users" / f"ds={ds}")
    expected = corruption.expected_check(spec)

    if corruption.outcome == "warn":
        reports = validate_day(ds, root, spec, params, gx_root=history.gx_root, data_docs=False)
        report = {r.kind: r for r in reports}[corruption.partition]
        assert report.success and all(r.success for r in reports), [r.summary() for r in reports]
        assert any(expected in line for line in report.warnings), (expected, report.warnings)
        assert profile_path(root, ds).exists()
        return

    with pytest.raises(DataValidationError) as info:
        validate_day(ds, root, spec, params, gx_root=history.gx_root, data_docs=False)
    report = {r.kind: r for r in info.value.reports}[corruption.partition]
    assert not report.success
    assert any(expected in line for line in report.failed), (expected, report.failed)
    assert expected in str(info.value)
    assert not profile_path(root, ds).exists()  # a bad day never becomes a baseline
    if corruption.needs_history:
        assert report.baseline["previous_day"] == history.days[-1]
