"""One date's state: what each daily task wrote for ``ds``, in ``runs/<ds>/`` of the workspace.

Every task reads and writes a date's state through a :class:`DayRecord`, never by file name:
``validate_data`` writes the feature spec (from the day's one Feast apply) and the validation result,
``version_data`` the data version, ``evaluate`` the NE, ``shift_gate`` the verdict; ``train_user_model``
keeps its point-in-time join in the record's cache. The registry's lineage record is built from it
(:meth:`DayRecord.lineage`), so the two never disagree. Each part is one JSON file written atomically:
a rerun of a task replaces its part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sum_models.spec import FeatureSpec
from sum_platform.files import read_json, write_json
from sum_platform.workspace import Workspace, ds_str

#: Part of the record -> its file in ``runs/<ds>/`` (the file names are what ``dvc.yaml`` and operators see).
PARTS = {
    "spec": "spec.json",
    "validation": "validation.json",
    "data_version": "data_version.json",
    "evaluation": "evaluation.json",
    "consumers": "consumers.json",  # the consumer check's table (sum_pipeline/check_consumers.py)
    "verdict": "gate.json",
    "materialize": "materialize.json",  # the daily batch's outcome (users written, users skipped and why)
    "profile": "data_profile.json",  # the validated day's data profile (the trailing checks' baseline)
}


class MissingDayState(LookupError):
    """A task needs a part of the day's record that the task writing it has not produced yet."""


@dataclass(frozen=True)
class DayRecord:
    """The state of one logical date in a workspace. Creating it touches nothing on disk.

    Example::

        day = DayRecord(Workspace(Path("/tmp/ws")), "2026-01-01")
        day.write("evaluation", {"ne": {"click": 0.8}})
        assert day.evaluation == {"ne": {"click": 0.8}}
    """

    ws: Workspace
    ds: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "ds", ds_str(self.ds))

    @property
    def folder(self) -> Path:
        return self.ws.run_dir(self.ds)

    def path(self, part: str) -> Path:
        return self.folder / PARTS[part]

    def read(self, part: str) -> dict[str, Any] | None:
        """The part as written, or None when no task has written it for this date."""
        path = self.path(part)
        return read_json(path) if path.exists() else None

    def require(self, part: str, written_by: str) -> dict[str, Any]:
        """The part; raises :class:`MissingDayState` naming the task to run first when it is absent."""
        value = self.read(part)
        if value is None:
            raise MissingDayState(f"ds={self.ds} has no {part} yet ({self.path(part)}): run {written_by} first")
        return value

    def write(self, part: str, payload: dict[str, Any], sort_keys: bool = True) -> Path:
        return write_json(self.path(part), payload, sort_keys=sort_keys)

    # ---- typed parts ---------------------------------------------------------------------------
    @property
    def spec(self) -> FeatureSpec:
        """The model's input spec as of the day's validation (the feature view applied that day)."""
        return FeatureSpec.from_dict(self.require("spec", "validate_data"))

    def write_spec(self, spec: FeatureSpec) -> Path:
        # Unsorted: the order of the spec's features is the order of the model's tables and projections.
        return self.write("spec", spec.to_dict(), sort_keys=False)

    @property
    def validation(self) -> dict[str, Any] | None:
        return self.read("validation")

    @property
    def data_version(self) -> dict[str, Any] | None:
        """``{"commit", "versions": {partition path: DVC hash}}`` once ``version_data`` ran."""
        return self.read("data_version")

    @property
    def evaluation(self) -> dict[str, Any] | None:
        return self.read("evaluation")

    @property
    def verdict(self) -> dict[str, Any] | None:
        return self.read("verdict")

    def joined_cache(self, key: str) -> Path:
        """Where the day's point-in-time join is cached for a (data version, spec) key."""
        return self.folder / f"joined-{key}.parquet"

    def stale_joins(self, key: str) -> list[Path]:
        """Cached joins of other keys (a fixed partition or a changed spec made them stale)."""
        keep = self.joined_cache(key)
        return [p for p in self.folder.glob("joined-*.parquet") if p != keep]

    # ---- lineage -------------------------------------------------------------------------------
    def lineage(self, *parts: str) -> dict[str, Any]:
        """The registry record's fields derived from this day's ``parts`` (those written so far).

        ``data_version`` -> the partitions' DVC hashes; ``validation`` -> its outcome, the validated date and
        the Data Docs; ``evaluation`` and ``verdict`` as written.
        """
        out: dict[str, Any] = {}
        for part in parts:
            value = self.read(part)
            if value is None:
                continue
            if part == "data_version":
                value = value["versions"]
            elif part == "validation":
                value = {"success": value["success"], "validated_ds": self.ds, "data_docs": value.get("data_docs")}
            out[part] = value
        return out
