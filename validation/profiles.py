"""Profiles of validated days: the baseline of the trailing checks, and today's bounds drawn from them.

A profile is a small summary of a partition (row count, label rates, content digest, a quantile partition
and the tail quantiles of every drift column, see :func:`profile_partition`). :func:`validation.data_checks.validate_day` writes the
day's profile to ``<ws>/runs/<ds>/data_profile.json`` only when both partitions of the day pass, and removes
it when a rerun of that day fails, so a bad day never becomes a baseline. :func:`load_history` reads the
profiles of the validated days before a date; :func:`trailing_plan` turns them into the bounds of the
trailing suite (:func:`validation.suites.build_trailing_suite`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sum_models.spec import FeatureSpec
from sum_platform.day_record import PARTS, DayRecord
from sum_platform.files import read_json
from sum_platform.workspace import Workspace
from validation.suites import CONTENT_DIGEST, check_kind, drift_columns, param_name

if TYPE_CHECKING:
    from sum_platform.config import Params

logger = logging.getLogger(__name__)

#: File (under ``<ws>/runs/<ds>/``) holding the profile of a validated day: the trailing checks' baseline.
PROFILE_FILE = PARTS["profile"]  # a part of the day's record (sum_platform.day_record)
PROFILE_VERSION = 1


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
        frame: The batch frame (partition plus helper columns, see :func:`validation.frames.batch_frame`).
        spec: The model's input spec.
        params: Platform params.
    """
    check_kind(kind)
    out: dict[str, Any] = {"rows": int(len(frame)), "content_digest": str(frame[CONTENT_DIGEST].iloc[0])
                           if CONTENT_DIGEST in frame.columns and len(frame) else None}
    if kind == "events":
        out["label_rates"] = {
            label: float(pd.to_numeric(frame[label], errors="coerce").mean())
            for label in spec.labels if label in frame.columns
        }
    bins, q = params.validation.drift_bins, params.validation.extreme_tail_quantile
    partitions, tails = {}, {}
    for column in drift_columns(kind, spec):
        if column in frame.columns:
            values = pd.to_numeric(frame[column], errors="coerce")
            part = _json_partition(quantile_partition(values, bins))
            if part is not None:
                partitions[column] = part
            if (tail := tail_quantiles(values, q)) is not None:
                tails[column] = tail
    out["partitions"] = partitions
    out["tails"] = tails
    return out


def tail_quantiles(values: Any, q: float) -> list[float] | None:
    """``[q, 1 - q]`` quantiles of the finite values (the robust range the extreme-values check widens); None
    without finite values."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    lo, hi = np.quantile(x, [q, 1.0 - q])
    return [float(lo), float(hi)]


def trailing_tails(days: list[dict[str, Any]], kind: str, column: str) -> list[list[float]]:
    """The tail quantiles of ``column`` on each validated day's ``kind`` profile that has them."""
    return [d[kind]["tails"][column] for d in days if column in (d[kind].get("tails") or {})]


def extreme_bounds(tails: list[list[float]], multiple: float) -> tuple[float, float, float, float]:
    """Bounds of the extreme-values check from the validated days' tail quantiles.

    The envelope ``[min of the days' low quantiles, max of their high quantiles]`` widened by ``multiple`` x its
    width on each side (a constant column's width counts as ``max(|value|, 1)``, so it is not a zero-width trap).

    Returns:
        ``(min_value, max_value, envelope_lo, envelope_hi)``.
    """
    lo, hi = min(t[0] for t in tails), max(t[1] for t in tails)
    span = hi - lo if hi > lo else max(abs(lo), abs(hi), 1.0)
    return lo - multiple * span, hi + multiple * span, lo, hi


def profile_path(workspace_root: Path, ds: str) -> Path:
    return DayRecord(Workspace(Path(workspace_root)), ds).path("profile")


def load_history(workspace_root: Path, ds: str, limit: int) -> list[dict[str, Any]]:
    """Profiles of the last ``limit`` validated days strictly before ``ds``, oldest first.

    Only days before ``ds`` count, so rerunning an old date sees the baseline its first run saw.
    """
    runs = Workspace(Path(workspace_root)).root / "runs"
    found = []
    for path in runs.glob(f"*/{PROFILE_FILE}"):
        day = path.parent.name
        try:
            if date.fromisoformat(day) >= date.fromisoformat(ds):
                continue
            profile = read_json(path)
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
    extreme: list[str] = field(default_factory=list)


def label_rate_bounds(mean: float, rows: int | None, max_relative_change: float, noise_z: float) -> tuple[float, float]:
    """Today's bounds on a label rate whose trailing mean is ``mean``.

    ``mean * (1 -/+ max_relative_change)``, widened to ``mean -/+ noise_z`` binomial standard errors
    ``sqrt(mean (1 - mean) / rows)`` when those are wider: a day of a few hundred rows varies by more than
    a fixed relative share through sampling alone (MovieLens), while a day of ~21k rows does not (simulator).
    """
    half = mean * max_relative_change
    if rows:
        half = max(half, noise_z * math.sqrt(max(mean * (1.0 - mean), 0.0) / rows))
    return mean - half, mean + half


def trailing_plan(kind: str, history: list[dict[str, Any]], spec: FeatureSpec, params: "Params",
                  rows: int | None = None) -> TrailingPlan | None:
    """Bounds of the trailing checks of a ``kind`` partition from the validated days' profiles.

    ``rows`` (today's row count) widens the label-rate bounds by their sampling noise (:func:`label_rate_bounds`).

    Returns:
        None when there is no validated day to compare with (the trailing suite is skipped).
    """
    check_kind(kind)
    cfg = params.validation
    days = [h for h in history if isinstance(h.get(kind), dict)]
    if not days:
        return None
    previous = days[-1]
    prev_kind = previous[kind]
    parameters: dict[str, Any] = {}
    notes: dict[str, str] = {}
    skipped: list[str] = []

    trailing_rows = [int(d[kind]["rows"]) for d in days]
    reference = float(np.median(trailing_rows))
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
            lo, hi = label_rate_bounds(mean, rows, tol, cfg.label_rate_noise_z)
            parameters[param_name("trailing_rate_min", label)] = lo
            parameters[param_name("trailing_rate_max", label)] = hi
            notes[f"expect_column_mean_to_be_between({label})"] = (
                f"trailing mean rate {mean:.4f} over {len(rates)} validated day(s) +/- {tol:.0%}, or "
                f"{cfg.label_rate_noise_z:g} standard errors at {rows} rows if wider: [{lo:.4f}, {hi:.4f}]")
            labels.append(label)

    drift: list[str] = []
    partitions = prev_kind.get("partitions", {})
    for column in drift_columns(kind, spec):
        stored = partitions.get(column)
        if stored is None:
            skipped.append(f"drift of {column!r}: no distribution on the previous validated day {previous['ds']}")
            continue
        parameters[param_name("previous_partition", column)] = _gx_partition(stored)
        drift.append(column)

    extreme: list[str] = []
    for column in drift_columns(kind, spec):
        tails = trailing_tails(days, kind, column)
        if len(tails) < cfg.extreme_min_days:
            skipped.append(f"extreme values of {column!r}: tail quantiles on {len(tails)} validated day(s), "
                           f"fewer than validation.extreme_min_days {cfg.extreme_min_days}")
            continue
        lo, hi, env_lo, env_hi = extreme_bounds(tails, cfg.extreme_span_multiple)
        parameters[param_name("extreme_min", column)] = lo
        parameters[param_name("extreme_max", column)] = hi
        q = cfg.extreme_tail_quantile
        notes[f"extreme_values({column})"] = (
            f"the p{100 * q:g}..p{100 * (1 - q):g} range of {len(tails)} validated day(s) is [{env_lo:.4g}, {env_hi:.4g}]"
            f", +/- {cfg.extreme_span_multiple:g} x its width")
        extreme.append(column)

    stuck = kind in cfg.stuck_check_kinds
    if stuck:
        parameters["trailing_content_digests"] = [d[kind].get("content_digest") or "" for d in days]
        notes["digest_days"] = json.dumps({d[kind].get("content_digest"): d["ds"] for d in days})
    baseline = {"previous_day": previous["ds"], "trailing_days": [d["ds"] for d in days]}
    return TrailingPlan(drift, labels, stuck, parameters, notes, baseline, skipped, extreme)
