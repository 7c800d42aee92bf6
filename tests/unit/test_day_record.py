"""The day record: one home for a date's state, written atomically, read by the tasks after the writer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sum_models.spec import FeatureSpec
from sum_platform.day_record import PARTS, DayRecord, MissingDayState
from sum_platform.files import replace_atomically, write_json, write_partition
from sum_platform.workspace import Workspace

SPEC = FeatureSpec(user_dense=("b", "a"), user_sparse={"topics": 7, "pages": 100}, ad_dense=("price",),
                   ad_sparse={"placement": 4, "category": 8}, labels=("click", "conversion"))


@pytest.fixture
def day(tmp_path: Path) -> DayRecord:
    return DayRecord(Workspace(tmp_path), "2026-01-02")


def test_parts_live_in_the_dates_run_folder_under_their_file_names(day):
    for part, name in PARTS.items():
        assert day.path(part) == day.ws.root / "runs" / "2026-01-02" / name
    assert not day.folder.exists()  # creating the record touches nothing


def test_the_spec_round_trips_with_the_order_of_its_tables(day):
    day.write_spec(SPEC)
    assert day.spec == SPEC
    # The order of the features is the order of the model's embedding tables and projections: a spec that
    # came back sorted would build a different model from the same seed.
    assert list(day.spec.user_sparse) == ["topics", "pages"] and day.spec.user_dense == ("b", "a")
    assert list(day.spec.ad_sparse) == ["placement", "category"]


def test_a_part_not_written_yet_names_the_task_that_writes_it(day):
    assert day.evaluation is None and day.verdict is None
    with pytest.raises(MissingDayState, match=r"ds=2026-01-02 has no spec yet .* run validate_data first"):
        day.spec
    with pytest.raises(MissingDayState, match="run evaluate first"):
        day.require("evaluation", "evaluate")


def test_a_rewrite_replaces_the_part(day):
    day.write("evaluation", {"ne": {"click": 0.9}, "stale": True})
    day.write("evaluation", {"ne": {"click": 0.8}})
    assert day.evaluation == {"ne": {"click": 0.8}}


def test_lineage_is_derived_from_the_written_parts_only(day):
    assert day.lineage("data_version", "validation", "evaluation") == {}
    day.write("data_version", {"ds": day.ds, "commit": "abc", "versions": {"data/events/ds=2026-01-02": "h1"}})
    day.write("validation", {"ds": day.ds, "success": True, "data_docs": "/docs/index.html", "reports": [1, 2]})
    day.write("verdict", {"blessed": True, "verdict": "blessed"})
    assert day.lineage("data_version", "validation") == {
        "data_version": {"data/events/ds=2026-01-02": "h1"},
        "validation": {"success": True, "validated_ds": "2026-01-02", "data_docs": "/docs/index.html"},
    }
    assert day.lineage("verdict") == {"verdict": {"blessed": True, "verdict": "blessed"}}


def test_only_the_current_join_is_kept(day):
    day.folder.mkdir(parents=True)
    for key in ("old1", "old2", "now"):
        day.joined_cache(key).write_bytes(b"x")
    assert sorted(p.name for p in day.stale_joins("now")) == ["joined-old1.parquet", "joined-old2.parquet"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "runs" / "gate.json"
    write_json(path, {"verdict": "held"})
    with pytest.raises(RuntimeError):
        with replace_atomically(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text().count("held") == 1
    assert [p.name for p in path.parent.iterdir()] == ["gate.json"]


def test_a_partition_is_replaced_whole(tmp_path):
    folder = tmp_path / "data" / "users" / "ds=2026-01-02"
    folder.mkdir(parents=True)
    (folder / "part-0.parquet").write_bytes(b"old")
    (folder / "part-1.parquet").write_bytes(b"old")  # a file the new partition does not have
    write_partition(pd.DataFrame({"user_id": [1, 2]}), folder)
    assert [p.name for p in folder.iterdir()] == ["part-0.parquet"]
    assert pd.read_parquet(folder)["user_id"].tolist() == [1, 2]
    assert [p.name for p in folder.parent.iterdir()] == ["ds=2026-01-02"]
