"""The gate over a study's chain of daily snapshots (sum_pipeline.study_gate.gate_chain): only blessed snapshots
serve, a held one leaves the last blessed one serving, the warm-up blesses what the shift alone would hold."""

from __future__ import annotations

import numpy as np
import pytest

from sum_pipeline.study_gate import gate_chain, held_days
from sum_platform.config import GateConfig

CFG = GateConfig(probe_users=64, warmup_promotions=2, min_mean_cosine=0.8, max_relative_l2_change=0.35, max_ne=1.0,
                 min_embedding_std=1e-4, min_mean_cosine_pooled=0.9, max_relative_l2_change_pooled=0.2,
                 max_ne_regression=0.05,
                 max_cosine_across_users=0.9, min_label_count=30, not_measurable_without_production="hold", mode="both", consumer_holdout_users=0.1, consumer_max_ne_regression_pct=1.0,
                 consumer_worse_tolerance=0.05, consumer_bootstrap=200)
NE_OK = {"click": 0.8}
SHAPE = (64, 2, 16)


def _drift(base: np.ndarray, seed: int, scale: float = 0.03) -> np.ndarray:
    """A near-identical snapshot: the base plus small noise."""
    return (base + np.random.default_rng(seed).normal(scale=scale, size=base.shape)).astype(np.float16)


def _reinit(seed: int) -> np.ndarray:
    """A reinit-like snapshot: unrelated embeddings of the same users."""
    return np.random.default_rng(1000 + seed).normal(size=SHAPE).astype(np.float16)


def _same_ne(t: int, j: int) -> dict:
    return dict(NE_OK)


@pytest.fixture()
def base() -> np.ndarray:
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float16)


def test_near_identical_snapshots_are_all_blessed_and_each_serves_the_next_day(base):
    probe = [base]
    for t in range(1, 6):
        probe.append(_drift(probe[-1], t))
    chain = gate_chain(probe, [NE_OK] * 6, _same_ne, CFG)
    assert [d.label for d in chain] == ["blessed"] * 6 and held_days(chain) == []
    assert [d.serves_next for d in chain] == [0, 1, 2, 3, 4, 5]
    assert [d.baseline for d in chain] == [None, 0, 1, 2, 3, 4]
    assert [d.shift_enforced for d in chain] == [False, False, True, True, True, True]  # warmup_promotions = 2


def test_a_reinit_like_candidate_is_held_and_production_keeps_serving(base):
    probe = [base, _drift(base, 1), _drift(base, 2), _reinit(3), _drift(base, 4)]
    chain = gate_chain(probe, [NE_OK] * 5, _same_ne, CFG)
    assert held_days(chain) == [3]
    assert chain[3].serves_next == 2  # the held day's next day is served by the last blessed snapshot
    assert any(r.startswith("embedding_0.mean_cosine") for r in chain[3].reasons)
    # The next candidate is judged against the last blessed snapshot (2), not the held one.
    assert chain[4].baseline == 2 and chain[4].blessed and chain[4].serves_next == 4


def test_warm_up_days_bless_a_shift_that_would_be_held_later(base):
    probe = [base, _reinit(1), _reinit(2)]  # every day unrelated to the last: a young tower's moves
    chain = gate_chain(probe, [NE_OK] * 3, _same_ne, CFG)
    # Day 1: one promotion before it (< 2): measured, not enforced -> blessed; day 2: two promotions -> held.
    assert [d.label for d in chain] == ["blessed", "blessed", "held"]
    assert any("warm-up" in r and "outside the thresholds" in r for r in chain[1].reasons)
    assert chain[2].serves_next == 1


def test_a_candidate_worse_than_production_on_the_holdout_is_held(base):
    probe = [base, _drift(base, 1), _drift(base, 2), _drift(base, 3)]
    asked = []

    def production_ne(t: int, j: int) -> dict:
        asked.append((t, j))
        return {"click": 0.7}  # production beats every candidate by 0.1 > max_ne_regression

    chain = gate_chain(probe, [NE_OK] * 4, production_ne, CFG)
    assert [d.label for d in chain] == ["blessed", "held", "held", "held"]
    assert asked == [(1, 0), (2, 0), (3, 0)]  # always the last blessed snapshot, on each day's holdout
    assert [d.serves_next for d in chain] == [0, 0, 0, 0]


def test_nothing_serves_until_a_candidate_is_blessed(base):
    probe = [np.full(SHAPE, np.nan, dtype=np.float16), base, _drift(base, 2)]
    chain = gate_chain(probe, [NE_OK] * 3, _same_ne, CFG)
    assert [d.label for d in chain] == ["held", "blessed", "blessed"]
    assert chain[0].serves_next is None and chain[1].baseline is None and chain[1].serves_next == 1


def test_the_chain_logs_each_candidate_s_mean_norm(base):
    probe = [base, base, 3.0 * base]
    chain = gate_chain(probe, [NE_OK] * 3, _same_ne, CFG)
    norms = np.linalg.norm(base.astype(np.float64), axis=2).mean(axis=0)
    np.testing.assert_allclose(chain[0].mean_norm, norms, rtol=1e-6)
    np.testing.assert_allclose(chain[2].mean_norm, 3.0 * norms, rtol=1e-3)
    assert not chain[2].blessed  # a 3x norm jump: relative L2 change 2.0 > 0.35, though the direction is the same
    assert any(r.startswith("embedding_0.relative_l2_change") for r in chain[2].reasons)


def test_mismatched_inputs_are_refused(base):
    with pytest.raises(ValueError, match="2 probe arrays but 1 NE"):
        gate_chain([base, base], [NE_OK], _same_ne, CFG)
    with pytest.raises(ValueError, match="differ in shape"):
        gate_chain([base, base[:10]], [NE_OK] * 2, _same_ne, CFG)


def test_the_pooled_comparison_follows_the_pool_unit(base):
    """Under write pooling serving hands downstream the raw latest version, so the pooled checks see the raw shift;
    under snapshot pooling the candidate is averaged with production and the version before it (smaller shift)."""
    probe = [base, _drift(base, 1, 0.2), _drift(base, 2, 0.4), _drift(base, 3, 0.6)]
    by_unit = {u: gate_chain(probe, [NE_OK] * 4, _same_ne, CFG, pool_unit=u) for u in ("snapshot", "write")}

    def values(chain, name):
        return [c["value"] for c in chain[3].checks if c["name"] == name]

    assert values(by_unit["write"], "embedding_0.pooled_mean_cosine") == values(by_unit["write"], "embedding_0.mean_cosine")
    assert values(by_unit["snapshot"], "embedding_0.pooled_mean_cosine")[0] > values(by_unit["write"],
                                                                                    "embedding_0.pooled_mean_cosine")[0]


def test_the_chain_judges_an_ne_by_its_evidence_as_the_daily_loop_does(base):
    """The study's gate hands the gate each NE's evidence: a first candidate whose holdout holds too few positives
    is not measurable and held (``not_measurable_without_production: hold``); with enough, it is blessed."""
    from sum_pipeline.study_gate import GateChain

    few = {"click": {"holdout_rows": 80, "positives": 5}}
    held = GateChain(CFG).step(base, NE_OK, _same_ne, evidence=few)
    assert not held.blessed and held.serves_next is None
    [check] = [c for c in held.checks if c["name"].startswith("ne")]
    assert check["outcome"] == "not_measurable"
    assert any("not_measurable_without_production" in r for r in held.reasons)

    enough = {"click": {"holdout_rows": 400, "positives": 120}}
    assert GateChain(CFG).step(base, NE_OK, _same_ne, evidence=enough).blessed
    # An NE the holdout could not define (one label class) is not measurable whatever the sizes say.
    one_class = GateChain(CFG).step(base, {}, _same_ne, evidence={"click": {"holdout_rows": 80, "positives": 0}},
                                    unmeasured={"click": "all 80 labels are negative"})
    assert not one_class.blessed
