"""The file-backed GX project of the data gate: lock, context, checkpoint reuse and Data Docs.

The project lives in ``<ws>/gx`` (``great_expectations.yml``, stores, ``uncommitted/data_docs``). It is
rerun-safe (every object is added or updated by name) and guarded by a file lock (:func:`project_lock`),
so concurrent runs on one project do not interleave their writes of ``great_expectations.yml``. A day's
checkpoint reuses the stored suites and validation definitions when their fingerprints match
(:func:`checkpoint_for`); Data Docs are built once for all the results of a day (:func:`build_docs`).

GX is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sum_models.spec import FeatureSpec
from sum_platform.files import exclusive_lock
from validation.suites import build_suite, build_trailing_suite

if TYPE_CHECKING:
    from sum_platform.config import Params
    from validation.profiles import TrailingPlan

DATASOURCE_NAME = "sum_partitions"
DATA_DOCS_SITE = "local_site"
#: Validation results listed on the Data Docs index (newest first; older result pages stay on disk).
DATA_DOCS_INDEX_LIMIT = 120


@contextmanager
def project_lock(gx_root: Path) -> Iterator[None]:
    """Holds the project's exclusive file lock (``<gx_root>/.sum_validation.lock``) for the block."""
    with exclusive_lock(gx_root / ".sum_validation.lock"):
        yield


def file_context(gx_root: Path):
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


def checkpoint_for(context, kind: str, spec: FeatureSpec, params: "Params", plan: TrailingPlan | None = None):
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


def suite_page_is_current(gx_root: Path, suite_name: str) -> bool:
    """Whether the Data Docs page of a stored suite was rendered after the suite was last written.

    A suite that a run reused as it was (see :func:`checkpoint_for`) renders to the same page: rebuilding
    it is pure cost (the drift checks' charts make a suite page about a second), so :func:`build_docs`
    callers pass a suite only when this is False, as ``make`` rebuilds only what is older than its source.
    """
    source = Path(gx_root) / "expectations" / f"{suite_name}.json"
    page = Path(gx_root) / "uncommitted" / "data_docs" / DATA_DOCS_SITE / "expectations" / f"{suite_name}.html"
    try:
        return page.stat().st_mtime_ns >= source.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def build_docs(gx_root: Path, resources: list) -> str | None:
    """Updates the local Data Docs with the given validation results (and suites) in one site build.

    Args:
        gx_root: The GX project.
        resources: GX resource identifiers (``ValidationResultIdentifier``, ``ExpectationSuiteIdentifier``).

    Returns:
        The path of the Data Docs ``index.html``.
    """
    with project_lock(gx_root):
        context = file_context(gx_root)
        if resources:
            context.build_data_docs(resource_identifiers=list(resources), build_index=True)
        return _data_docs_index(context, gx_root)
