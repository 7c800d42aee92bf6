"""Data gate of the daily pipeline: one Great Expectations (GX 1.x) checkpoint per partition, and its report.

Each day has two partitions (see :class:`sum_platform.workspace.Workspace`)::

    data/events/ds=YYYY-MM-DD/*.parquet   one row per ad impression
    data/users/ds=YYYY-MM-DD/*.parquet    one row per user (the user tower's raw features)

:func:`validate_partition` reads a partition, runs it through a real GX ``Checkpoint`` (a
``ValidationDefinition`` over a pandas dataframe asset) in the file-backed GX project of
:mod:`validation.gx_project`, and returns a :class:`ValidationReport` whose ``failed`` entries name the
expectation, the column and what was observed (:mod:`validation.messages`). The checkpoint runs the
contract suite of the partition type and, when a validated day precedes ``ds``, its trailing suite
(:mod:`validation.suites`, bounds from :mod:`validation.profiles`); with no validated day before ``ds``
(the first day) the trailing suite is not run and the report lists it under ``skipped``.

:func:`validate_day` validates both partitions of a date (the users partition is read once: its user ids
feed the events' referential check), builds the Data Docs once, and raises :class:`DataValidationError` if
any check fails, so the run stops there. When both pass it writes the day's profile (the next days'
baseline); when one fails it removes a profile an earlier run of the date left.

GX is imported lazily: importing this module (e.g. while Airflow parses a DAG) stays cheap.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sum_models.spec import FeatureSpec
from sum_platform.files import write_json
from sum_platform.partitions import PartitionReadError, read_partition
from sum_platform.workspace import Workspace
from validation.frames import batch_frame, partition_user_ids
from validation.gx_project import (DATA_DOCS_SITE, build_docs, checkpoint_for, file_context, project_lock,
                                   suite_page_is_current)
from validation.messages import describe_failure
from validation.profiles import PROFILE_VERSION, load_history, profile_partition, profile_path, trailing_plan
from validation.suites import KINDS, Kind, check_kind, suite_parameters, trailing_suite_name

if TYPE_CHECKING:
    from sum_platform.config import Params

logger = logging.getLogger(__name__)


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
# Entry points
# ---------------------------------------------------------------------------------------------
def validate_partition(
    kind: Kind, ds: str, path: Path, spec: FeatureSpec, params: "Params", gx_root: Path,
    history: list[dict[str, Any]] | None = None, user_ids: np.ndarray | None = None,
    build_data_docs: bool = True, partition: pd.DataFrame | None = None,
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
        partition: The partition as already read from ``path`` (None: read it here).

    Returns:
        The :class:`ValidationReport`; ``report.profile`` holds the partition's profile.
    """
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    check_kind(kind)
    ds = ds if isinstance(ds, str) else ds.isoformat()
    parameters: dict[str, Any] = dict(suite_parameters(ds))
    path, gx_root = Path(path), Path(gx_root)
    try:
        df = read_partition(path) if partition is None else partition
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
    plan = trailing_plan(kind, history or [], spec, params, rows=len(frame))
    if plan is None:
        skipped.append("trailing checks (row count, label rates, drift vs the previous day, stuck content): "
                       f"no validated day before {ds}")
        notes: dict[str, str] = {}
    else:
        skipped += plan.skipped
        notes = dict(plan.notes) | {"previous_day": plan.baseline["previous_day"]}

    with project_lock(gx_root):
        context = file_context(gx_root)
        checkpoint = checkpoint_for(context, kind, spec, params, plan)
        result = checkpoint.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            run_id=RunIdentifier(run_name=f"{kind}-{ds}"),
        )
    resources: list = list(result.run_results)
    resources += [ExpectationSuiteIdentifier(name=r.suite_name) for r in result.run_results.values()
                  if not suite_page_is_current(gx_root, r.suite_name)]
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
                elif key.startswith("extreme_share"):  # the share of the rows beyond the bounds
                    value = float((r.result or {}).get("unexpected_percent") or 0.0) / 100.0
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
        "expect_column_values_to_be_between": "extreme_share",  # the trailing suite's only range check
    }
    name = names.get(cfg.type, cfg.type)
    return name if "column" not in kwargs else f"{name}({kwargs['column']})"


def validate_day(
    ds: str, workspace_root: Path, spec: FeatureSpec, params: "Params", gx_root: Path | None = None,
    data_docs: bool = True,
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
        data_docs: Update the Data Docs site (False: the results stay in the GX project's validation
            store, the site is not rebuilt, ``data_docs_index`` is None; for callers that judge many
            partitions, such as the corruption catalogue's tests).

    Raises:
        DataValidationError: If any partition fails (after all partitions ran and Data Docs were built);
            the message lists every failed check, and ``err.reports`` holds the reports.
    """
    ws = Workspace(Path(workspace_root))
    gx_root = Path(gx_root) if gx_root is not None else ws.gx_dir
    folders = {"events": ws.events_dir(ds), "users": ws.users_dir(ds)}
    history = load_history(ws.root, ds, params.validation.trailing_days)
    try:  # read once: its user ids feed the events' referential check, the frame its own validation
        users = read_partition(folders["users"])
    except PartitionReadError:
        users = None  # validate_partition reports why
    user_ids = partition_user_ids(users, folders["users"], params)
    reports = [
        validate_partition(kind, ds, folders[kind], spec, params, gx_root, history=history,  # type: ignore[arg-type]
                           user_ids=user_ids if kind == "events" else None, build_data_docs=False,
                           partition=users if kind == "users" else None)
        for kind in KINDS
    ]
    if data_docs:
        docs = build_docs(gx_root, [res for r in reports for res in r.docs_resources])  # one site build
        logger.info("Data Docs for ds=%s: %s", ds, docs)
    else:
        docs = None
    for report in reports:
        report.data_docs_index = docs
    profile = profile_path(ws.root, ds)
    if not all(r.success for r in reports):
        if profile.exists():
            profile.unlink()
            logger.warning("ds=%s failed validation: removed its earlier profile %s (no longer a baseline)", ds, profile)
        err = DataValidationError(reports)
        logger.error("%s", err)
        raise err
    write_json(profile, {"version": PROFILE_VERSION, "ds": ds, **{r.kind: r.profile for r in reports}})
    return reports
