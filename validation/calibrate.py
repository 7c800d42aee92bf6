"""Calibrating the data gate's relative checks on normal days of a source.

The trailing checks (:mod:`validation.suites`) fail a day whose row count, label rates or feature
distributions move further from the trailing validated days than ``params.yaml`` ``validation`` allows.
Those thresholds must sit above what the source's *normal* days do. :func:`calibrate` replays consecutive
days of the configured source through the same profiles the gate keeps (:func:`validation.profiles.profile_partition`)
and measures, per day against the days before it, what each check would see:

* ``rows_ratio``: rows / the trailing median (``row_count_min_ratio`` .. ``row_count_max_ratio``);
* ``label_rate_change.<label>``: rate / trailing mean - 1, and ``label_rate_z.<label>`` the same change in
  binomial standard errors at the day's rows (the bound is the wider of ``label_rate_max_relative_change``
  and ``label_rate_noise_z`` standard errors);
* ``kl.<column>``: KL(today || previous day) over the previous day's quantile bins, computed as GX's
  ``expect_column_kl_divergence_to_be_less_than`` does (``scipy.stats.entropy`` of the observed and
  expected weights), for ``drift_max_kl`` / ``sparse_length_max_kl``;
* ``extreme.<column>``: how far the day's most extreme value lies beyond the trailing days' tail range, in
  widths of that range (``extreme_span_multiple``; every row counts when ``extreme_max_share`` is 0).

No GX checkpoint runs, so a few hundred days take seconds; the gate itself stays the judge (the DAG's
tests run the real checkpoints on days of the same sources).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd

from sum_models.spec import FeatureSpec
from sum_platform.sources import day_frames
from validation.frames import batch_frame
from validation.profiles import extreme_bounds, profile_partition, trailing_tails
from validation.suites import KINDS, drift_columns

if TYPE_CHECKING:
    from sum_platform.config import Params

__all__ = ["Calibration", "calibrate", "kl_against", "extreme_excess", "day_statistics"]


def kl_against(values: Any, stored: dict) -> float | None:
    """KL(values || stored partition) as GX computes it; None without finite values.

    Args:
        values: Today's values of the column.
        stored: The previous day's profile partition (``inner_edges``, ``weights``; outer bins open).
    """
    from scipy import stats

    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    inner = np.asarray(stored["inner_edges"], dtype=np.float64)
    counts = np.bincount(np.searchsorted(inner, x, side="right"), minlength=len(inner) + 1)
    return float(stats.entropy(counts / counts.sum(), np.asarray(stored["weights"], dtype=np.float64)))


def extreme_excess(values: Any, tails: list[list[float]]) -> float | None:
    """How far today's most extreme value lies beyond the validated days' tail range, in widths of that range
    (0: inside): the smallest ``extreme_span_multiple`` this day passes. None without finite values."""
    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    below, _, lo, hi = extreme_bounds(tails, 1.0)
    span = lo - below  # the width the bounds are measured in
    return float(max(0.0, (x.max() - hi) / span, (lo - x.min()) / span))


def day_statistics(today: dict[str, dict], frames: dict[str, pd.DataFrame], history: list[dict[str, Any]],
                   spec: FeatureSpec, params: "Params") -> dict[str, float]:
    """What the trailing checks would see on one day.

    Args:
        today: The day's profiles by kind (``events``, ``users``).
        frames: The day's batch frames by kind.
        history: The profiles of the validated days before it, oldest first (``{"ds", "events", "users"}``).
    """
    out: dict[str, float] = {}
    days = history[-params.validation.trailing_days:]
    if not days:
        return out
    for kind in KINDS:
        rows = [d[kind]["rows"] for d in days]
        out[f"{kind}.rows_ratio"] = today[kind]["rows"] / max(float(np.median(rows)), 1.0)
        for column in drift_columns(kind, spec):
            stored = days[-1][kind]["partitions"].get(column)
            if stored is not None and column in frames[kind].columns:
                kl = kl_against(frames[kind][column], stored)
                if kl is not None:
                    out[f"kl.{column}"] = kl
    for kind in KINDS:  # extreme values: how far beyond the trailing range, in widths of that range
        for column in drift_columns(kind, spec):
            tails = trailing_tails(days, kind, column)
            if len(tails) >= params.validation.extreme_min_days and column in frames[kind].columns:
                excess = extreme_excess(frames[kind][column], tails)
                if excess is not None:
                    out[f"extreme.{column}"] = excess
    n = today["events"]["rows"]
    for label, rate in today["events"].get("label_rates", {}).items():
        mean = float(np.mean([d["events"]["label_rates"][label] for d in days]))
        if mean > 0:
            out[f"label_rate_change.{label}"] = rate / mean - 1.0
            out[f"label_rate_z.{label}"] = (rate - mean) / math.sqrt(max(mean * (1 - mean), 1e-12) / max(n, 1))
    return out


@dataclass
class Calibration:
    """Per-day statistics of a run of days, and the observed range of each."""

    days: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    statistics: list[dict[str, float]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        """One row per day: ``ds``, ``events_rows`` and every statistic."""
        out = pd.DataFrame(self.statistics)
        out.insert(0, "events_rows", self.rows)
        out.insert(0, "ds", self.days)
        return out

    def ranges(self) -> pd.DataFrame:
        """Per statistic: min, median, max and the share of days it was measured on."""
        df = pd.DataFrame(self.statistics)
        return pd.DataFrame({"min": df.min(), "median": df.median(), "max": df.max(),
                             "days": df.notna().sum()}).sort_index()

    def summary(self, params: "Params") -> dict[str, dict[str, float]]:
        """Observed extremes next to the thresholds in force (``margin``: threshold / observed extreme)."""
        cfg = params.validation
        r = self.ranges()

        def worst(prefix: str, how: str) -> float:
            rows = r[r.index.str.startswith(prefix)]
            return float(rows["max"].max() if how == "max" else rows["min"].min()) if len(rows) else float("nan")

        z = max(abs(worst("label_rate_z.", "min")), abs(worst("label_rate_z.", "max")))
        change = max(abs(worst("label_rate_change.", "min")), abs(worst("label_rate_change.", "max")))
        dense_kl = max((float(v) for k, v in r["max"].items() if k.startswith("kl.") and not k.endswith("__len")),
                       default=float("nan"))
        len_kl = max((float(v) for k, v in r["max"].items() if k.startswith("kl.") and k.endswith("__len")),
                     default=float("nan"))
        rows_min = min(worst("events.rows_ratio", "min"), worst("users.rows_ratio", "min"))
        rows_max = max(worst("events.rows_ratio", "max"), worst("users.rows_ratio", "max"))
        return {
            "row_count_min_ratio": {"observed": rows_min, "threshold": cfg.row_count_min_ratio},
            "row_count_max_ratio": {"observed": rows_max, "threshold": cfg.row_count_max_ratio},
            "label_rate_max_relative_change": {"observed": change, "threshold": cfg.label_rate_max_relative_change},
            "label_rate_noise_z": {"observed": z, "threshold": cfg.label_rate_noise_z},
            "drift_max_kl": {"observed": dense_kl, "threshold": cfg.drift_max_kl},
            "sparse_length_max_kl": {"observed": len_kl, "threshold": cfg.sparse_length_max_kl},
            "min_event_rows": {"observed": float(min(self.rows)) if self.rows else float("nan"),
                               "threshold": cfg.min_event_rows},
            "extreme_span_multiple": {"observed": worst("extreme.", "max"), "threshold": cfg.extreme_span_multiple},
        }


def calibrate(params: "Params", dates: Iterable[str], spec: FeatureSpec, progress=None) -> Calibration:
    """Replays ``dates`` of the configured source (:func:`sum_platform.sources.day_frames`) as if each passed.

    Days with fewer than ``validation.min_event_rows`` impressions are skipped (the gate fails them on their
    own, and they never become a baseline), and listed in ``skipped``.

    Args:
        params: Platform params (source, events contract, ``validation`` section).
        dates: Consecutive dates, oldest first.
        spec: The model's input spec (which columns drift).
        progress: Called with each date after it is measured (a progress bar's ``advance``).
    """
    out = Calibration()
    history: list[dict[str, Any]] = []
    for ds in dates:
        events, users = day_frames(ds, params)
        if len(events) < params.validation.min_event_rows:
            out.skipped[ds] = f"{len(events)} impressions < validation.min_event_rows {params.validation.min_event_rows}"
        else:
            frames = {"events": batch_frame("events", events, spec, params, users[params.events.user_id].to_numpy()),
                      "users": batch_frame("users", users, spec, params)}
            today = {kind: profile_partition(kind, frames[kind], spec, params) for kind in KINDS}
            stats = day_statistics(today, frames, history, spec, params)
            if stats:
                out.days.append(ds)
                out.rows.append(len(events))
                out.statistics.append(stats)
            history.append({"ds": ds, **today})
        if progress is not None:
            progress(ds)
    return out
