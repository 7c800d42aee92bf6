"""The consumer check of the snapshot gate: what each downstream model would lose if the candidate were promoted.

The proxies (the candidate's own NE, its shift against production) stand in for what SUM's users care about: the
downstream models fed what serving hands them (paper Table 4: a snapshot's shift costs downstream NE). This check
measures that directly. Each saved downstream model (as saved: no retraining) scores the day's *consumer holdout*,
the impressions of a fixed share of users the candidate did not train on (``gate.consumer_holdout_users``), three
ways, on the same rows:

* ``now``: with what serving hands out now (production pooled with the older versions, the row owner's rule);
* ``after``: with what serving would hand out once the candidate is promoted (the same rule, candidate shifted in);
* ``without``: the model's twin trained without SUM (no embeddings at all).

Per consumer it reports NE of each (eq. 9), the relative change ``100 (NE_after / NE_now - 1)`` with a paired
95 % bootstrap interval that resamples *users* (a user's impressions share their embedding, so they move together),
the share of impressions whose prediction moves away from its label by more than ``consumer_worse_tolerance``, and
``after`` against ``without`` (%, interval alike): whether SUM still helps the consumer after the promotion.

Outcome: **fail** when the change's interval lies above 0 and its point estimate above
``consumer_max_ne_regression_pct`` (a regression both real and larger than tolerated); **not measurable** with
fewer than ``min_label_count`` rows of either label (the NE difference is then mostly noise); else **pass**.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sum_models.metrics import DEFAULT_EPS
from sum_platform.config import GateConfig

#: The paired interval's coverage.
CONFIDENCE = 0.95
#: Resamples drawn at once (memory: this many x users floats).
_CHUNK = 100


@dataclass(frozen=True)
class ConsumerEffect:
    """One consumer's row of the table (JSON-ready through :meth:`to_dict`).

    Attributes:
        ne: NE of the consumer on the holdout with ``now``, ``after`` and ``without`` (None: not defined).
        change_pct: ``100 (NE_after / NE_now - 1)``: positive means the promotion makes the consumer worse.
        change_ci: Its paired bootstrap interval (users resampled), ``[lo, hi]``.
        worse_share: Share of impressions whose prediction moves away from its label by more than the tolerance.
        vs_without_pct: ``100 (NE_after / NE_without - 1)``: positive means worse than no SUM at all.
        outcome: ``pass`` | ``fail`` | ``not_measurable``; ``why`` says why when not ``pass``.
    """

    consumer: str
    rows: int
    users: int
    positives: int
    ne: dict[str, float | None]
    change_pct: float | None
    change_ci: list[float] | None
    worse_share: float | None
    vs_without_pct: float | None
    vs_without_ci: list[float] | None
    threshold_pct: float
    outcome: str
    why: str = ""
    model_day: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The consumer as a verdict line (:func:`consumer_line`)."""
        return consumer_line(self.to_dict())


def consumer_line(row: dict[str, Any]) -> str:
    """A consumer's row (``ConsumerEffect.to_dict()``) as a verdict line: the NE change after vs now with its
    interval, the threshold, the evidence, the share of impressions made worse and the change against no SUM."""
    evidence = f"{row['positives']} positives in {row['rows']} impressions of {row['users']} users"
    if row["outcome"] == "not_measurable":
        return f"consumer {row['consumer']} not measurable: {row.get('why', '')} ({evidence})"
    worse, floor = row.get("worse_share"), row.get("vs_without_pct")
    change = f"{row['change_pct']:+.2f} % {interval_text(row.get('change_ci'))}"
    return (f"consumer {row['consumer']}: NE {change} after vs now, "
            f"holds beyond +{row['threshold_pct']:g} % with the interval above 0 ({evidence})"
            + ("" if worse is None else f"; {100 * worse:.1f} % of impressions worse")
            + ("" if floor is None else
               f"; vs no SUM {floor:+.2f} % {interval_text(row.get('vs_without_ci'))}")
            + (f" -- {row['why']}" if row["outcome"] == "fail" else ""))


def interval_text(ci: list[float] | None) -> str:
    """``[lo, hi]`` as ``[+lo, +hi]`` (two decimals), ``[-]`` without an interval."""
    return "[-]" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row log loss (nats), probabilities clipped as the NE of ``sum_models.metrics`` clips them."""
    p = np.clip(np.asarray(p, dtype=np.float64), DEFAULT_EPS, 1.0 - DEFAULT_EPS)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def _ne(loss: np.ndarray, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Eq. 9 from summed log loss, rows and positives (any leading shape: one NE per resample)."""
    rate = pos / rows
    with np.errstate(divide="ignore", invalid="ignore"):
        background = -(rate * np.log(rate) + (1.0 - rate) * np.log1p(-rate))
        return (loss / rows) / background


def paired_ne_ratio(users: np.ndarray, labels: np.ndarray, loss_a: np.ndarray, loss_b: np.ndarray,
                    resamples: int, seed: int) -> tuple[float, list[float] | None]:
    """``100 (NE_a / NE_b - 1)`` on the rows, and its percentile bootstrap interval over users.

    Both NEs are measured on the same resampled rows (a paired contrast): each resample draws users with
    replacement and takes all of a drawn user's rows as many times as the user was drawn.

    Args:
        users: ``[N]`` user id of each row.
        labels: ``[N]`` 0/1 labels.
        loss_a, loss_b: ``[N]`` per-row log loss under the two arms.
        resamples: Bootstrap resamples.
        seed: The resampling's seed (the same day gives the same interval).

    Returns:
        ``(point, [lo, hi])``; the interval is None when fewer than two users hold the rows.
    """
    codes, inverse = np.unique(users, return_inverse=True)
    n_users = len(codes)
    per_user = np.stack([np.bincount(inverse, weights=w, minlength=n_users)
                         for w in (np.ones(len(labels)), labels.astype(np.float64), loss_a, loss_b)])  # [4, U]
    total = per_user.sum(axis=1)
    point = float(100.0 * (_ne(total[2], total[0], total[1]) / _ne(total[3], total[0], total[1]) - 1.0))
    if n_users < 2:
        return point, None
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        draws = rng.integers(0, n_users, size=(b, n_users))
        weights = np.stack([np.bincount(row, minlength=n_users) for row in draws]).astype(np.float64)  # [b, U]
        rows, pos, la, lb = (weights @ per_user[i] for i in range(4))
        ratios.append(100.0 * (_ne(la, rows, pos) / _ne(lb, rows, pos) - 1.0))
    values = np.concatenate(ratios)
    values = values[np.isfinite(values)]  # a resample of one label class has no NE
    if len(values) < resamples // 2:
        return point, None
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return point, [float(lo), float(hi)]


def measure_consumer(name: str, users: np.ndarray, labels: np.ndarray, p_now: np.ndarray, p_after: np.ndarray,
                     p_without: np.ndarray | None, *, min_label_count: int, max_regression_pct: float,
                     worse_tolerance: float, resamples: int, seed: int, model_day: str | None = None
                     ) -> ConsumerEffect:
    """One consumer's effect of the promotion (see the module docstring for the rule).

    Args:
        name: The consumer (a ``downstream.models`` name).
        users: ``[N]`` user of each holdout impression.
        labels: ``[N]`` the consumer's label (0/1).
        p_now, p_after: ``[N]`` its predictions with what serving hands out now / after the promotion.
        p_without: ``[N]`` its twin's predictions without SUM, or None (no such model saved).
        min_label_count: ``gate.min_label_count``: fewer rows of either label -> not measurable.
        max_regression_pct: ``gate.consumer_max_ne_regression_pct``.
        worse_tolerance: ``gate.consumer_worse_tolerance`` (probability).
        resamples: ``gate.consumer_bootstrap``.
        seed: Seed of the bootstrap.
        model_day: The day the consumer's saved weights were trained on (reported).

    Returns:
        The :class:`ConsumerEffect`.
    """
    y = np.asarray(labels, dtype=np.float64)
    users = np.asarray(users)
    rows, positives = int(len(y)), int(y.sum())
    n_users = int(len(np.unique(users))) if rows else 0
    loss = {arm: _log_loss(p, y) for arm, p in (("now", p_now), ("after", p_after), ("without", p_without))
            if p is not None}
    ne: dict[str, float | None] = {arm: None for arm in ("now", "after", "without")}
    common = dict(consumer=name, rows=rows, users=n_users, positives=positives, threshold_pct=float(max_regression_pct),
                  model_day=model_day)
    scarce = min(positives, rows - positives)
    if scarce < min_label_count:
        why = (f"{scarce} rows of the scarcer label, needs >= {min_label_count} of each (gate.min_label_count)"
               if scarce else "one label class only")
        return ConsumerEffect(ne=ne, change_pct=None, change_ci=None, worse_share=None, vs_without_pct=None,
                              vs_without_ci=None, outcome="not_measurable", why=why, **common)
    for arm, values in loss.items():
        ne[arm] = float(_ne(values.sum(), float(rows), float(positives)))
    change, change_ci = paired_ne_ratio(users, y, loss["after"], loss["now"], resamples, seed)
    vs_without, vs_without_ci = (None, None)
    if "without" in loss:
        vs_without, vs_without_ci = paired_ne_ratio(users, y, loss["after"], loss["without"], resamples, seed + 1)
    # A prediction "worse" moved away from its label: |p_after - y| exceeds |p_now - y| by more than the tolerance.
    moved = np.abs(np.asarray(p_after, np.float64) - y) - np.abs(np.asarray(p_now, np.float64) - y)
    worse = float((moved > worse_tolerance).mean())
    regressed = change_ci is not None and change_ci[0] > 0 and change > max_regression_pct
    why = "" if not regressed else (f"NE worse by {change:+.2f} % (interval {interval_text(change_ci)} above 0), "
                                    f"beyond +{max_regression_pct:g} % (gate.consumer_max_ne_regression_pct)")
    return ConsumerEffect(ne=ne, change_pct=change, change_ci=change_ci, worse_share=worse, vs_without_pct=vs_without,
                          vs_without_ci=vs_without_ci, outcome="fail" if regressed else "pass", why=why, **common)


def consumer_users(user_ids: Any, share: float) -> np.ndarray:
    """Whether each user belongs to the consumer holdout: a hash of the user id picks ``share`` of users, the same
    users every day (so a user is never in the candidate's training one day and scored as unseen the next)."""
    import pandas as pd

    if share <= 0:
        return np.zeros(len(user_ids), dtype=bool)
    bucket = pd.util.hash_pandas_object(pd.Series(np.asarray(user_ids)).astype(str), index=False).to_numpy() % 10_000
    return bucket < int(round(share * 10_000))


def left_out_of_training(user_ids: Any, cfg: GateConfig) -> np.ndarray:
    """The rows of the consumer-holdout users, which the candidate must not train on (none under ``gate.mode:
    proxies``, which measures no consumer)."""
    if cfg.mode == "proxies":
        return np.zeros(len(user_ids), dtype=bool)
    return consumer_users(user_ids, cfg.consumer_holdout_users)
