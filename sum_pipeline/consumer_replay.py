"""The consumer check in a one-process replay of the daily loop (``sumctl calibrate --gate``).

As deployed, every promotion triggers ``sum_downstream``, which trains each downstream model (with and without SUM,
warm-started) on the promoted day's impressions with what serving handed out during that day; the next days'
``check_consumers`` scores those saved models on the consumer holdout with what serving hands out now and after the
candidate's promotion. :class:`ConsumerReplay` does the same in memory, day by day: the models it trains are the
ones the DAG would have saved, and :meth:`ConsumerReplay.measure` scores them through the DAG task's own
:func:`sum_pipeline.check_consumers.measure_consumers`.

What serving handed out is the row owner's pooling (``validation.gate.served_values``) over the promoted snapshots'
embeddings of each user's last row of the day (as the consumer check embeds its users), not the point-in-time
values of the online store's write log: a replay has no store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sum_models.shift import POOL_DEPTH
from sum_pipeline.check_consumers import Consumer, measure_consumers
from sum_pipeline.study_data import Day
from sum_platform.config import Params
from validation.consumers import consumer_users
from validation.gate import served_values


class ConsumerReplay:
    """The downstream models as the daily loop would have saved them, and the consumer check on them.

    Call :meth:`measure` with each day's candidate before the gate judges it, then :meth:`after_day` with the
    verdict (a promotion trains the consumers on the day, then serves the candidate).

    Args:
        params: The source's params (``gate``, ``downstream``, ``serving.pool_unit``).
        spec: The SUM model's feature spec (to embed the day's users).
    """

    def __init__(self, params: Params, spec) -> None:
        from sum_platform.downstream_inputs import downstream_specs_for

        self.params, self.spec = params, spec
        self.specs = downstream_specs_for(params)
        self.promoted: list[tuple[str, Any]] = []  # (snapshot id, model), newest first: what serving pools
        self.models: dict[str, dict[str, Any]] = {}  # consumer -> {"with_sum": model, "without_sum": model}
        self.model_day: str | None = None
        self.covered = False  # the latest training day had served embeddings (else its models cannot judge)
        self._day: str | None = None
        self._served: list[np.ndarray] = []  # the promoted snapshots' embeddings of today's users, newest first

    @property
    def enabled(self) -> bool:
        return self.params.gate.mode != "proxies"

    def _embed_served(self, day: Day, latest: pd.DataFrame) -> list[np.ndarray]:
        import torch

        from sum_models.snapshot import embed_users

        if self._day != day.ds:
            with torch.no_grad():
                self._served = [embed_users(m.user_tower, latest, self.spec) for _, m in self.promoted[:POOL_DEPTH]]
            self._day = day.ds
        return self._served

    def _pooled(self, served: list[np.ndarray], candidate: np.ndarray | None, candidate_id: str):
        ids = [sid for sid, _ in self.promoted[:POOL_DEPTH]]
        return served_values(served[0] if candidate is None else candidate, served[0], served[1:], candidate_id,
                             ids[0], ids[1:], self.params.serving.pool_unit)

    def measure(self, day: Day, latest: pd.DataFrame, candidate: np.ndarray, candidate_id: str
                ) -> list[dict[str, Any]] | None:
        """The consumer table of the day's candidate (``ConsumerEffect`` dicts).

        Args:
            day: The day (its impressions are scored on the consumer-holdout users only).
            latest: Each user's last row of the day, the rows ``candidate`` embeds.
            candidate: ``[U, K, D]`` the candidate's embeddings of ``latest``.
            candidate_id: The candidate's snapshot id (the pooling rule reads ids).

        Returns:
            None under ``gate.mode: proxies``; ``[]`` with nothing served yet or no consumer trained yet.
        """
        if not self.enabled:
            return None
        if not self.promoted or not self.models:
            return []
        uid = self.params.events.user_id
        frame = day.frame[consumer_users(day.frame[uid].to_numpy(), self.params.gate.consumer_holdout_users)]
        frame = frame.reset_index(drop=True)
        if frame.empty:
            return []
        now, after = self._pooled(self._embed_served(day, latest), candidate, candidate_id)
        at = pd.Index(latest[uid].to_numpy()).get_indexer(frame[uid].to_numpy())
        # As check_consumers: a user some snapshot cannot embed (non-finite) has nothing served, and is not scored.
        finite = np.isfinite(now.astype(np.float32)).all(axis=(1, 2)) & np.isfinite(after.astype(np.float32)).all(
            axis=(1, 2))
        keep = finite[at]
        frame, at = frame[keep].reset_index(drop=True), at[keep]
        why = "" if self.covered else f"its model ({self.model_day}) was trained when no embedding had been served yet"
        if not why and frame.empty:
            why = "no consumer-holdout user has finite embeddings under the candidate and every pooled snapshot"
        consumers = [Consumer(name, arms["with_sum"], arms["without_sum"], model_day=self.model_day,
                              unmeasurable_why=why) for name, arms in self.models.items()]
        seed = self.params.seed + int(pd.Timestamp(day.ds).toordinal())
        return measure_consumers(consumers, frame, frame[uid].to_numpy(), now[at], after[at], self.params.gate, seed)

    def after_day(self, day: Day, latest: pd.DataFrame, promoted: bool, model: Any, snapshot_id: str) -> None:
        """After the gate: a promoted candidate triggers the consumers' training on the day (with what was served
        during it, before this promotion), then serves."""
        if not promoted:
            return
        if self.enabled:
            self._train(day, latest)
        self.promoted.insert(0, (snapshot_id, model))
        del self.promoted[POOL_DEPTH:]
        self._day = None

    def _train(self, day: Day, latest: pd.DataFrame) -> None:
        from sum_models.downstream_train import train_downstream

        cfg, uid = self.params.downstream, self.params.events.user_id
        k, d = self.params.model.num_embeddings, self.params.model.embedding_dim
        if self.promoted:
            now, _ = self._pooled(self._embed_served(day, latest), None, "candidate")
            at = pd.Index(latest[uid].to_numpy()).get_indexer(day.frame[uid].to_numpy())
            rows = now[at].astype(np.float32)
        else:  # nothing was served during the first promoted day
            rows = np.full((len(day.frame), k, d), np.nan, dtype=np.float32)
        seed = self.params.seed + int(pd.Timestamp(day.ds).toordinal())
        for name, base in self.specs.items():
            arms = self.models.setdefault(name, {"with_sum": None, "without_sum": None})
            for arm in arms:
                spec = base.with_embeddings(arm == "with_sum")
                arms[arm], _ = train_downstream(spec, day.frame, rows if arm == "with_sum" else None,
                                                epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.learning_rate,
                                                seed=seed, init_from=arms[arm])
        self.model_day, self.covered = day.ds, bool(self.promoted)
