"""Candidate faults for gate drills and the soak (the DAG's ``candidate_fault`` param); never set in normal runs."""

from __future__ import annotations

from typing import Callable

#: reinit: export re-initialised weights; perturb: add noise as large as each weight tensor's spread;
#: explode_lr: train with a learning rate 1000x the configured one; nan: poison one weight with NaN; scale: the
#: trained tower's embeddings multiplied by SCALE_FACTOR (its output LC scaled: the directions stay, every
#: consumer's projection of them grows; a bounded tower, model.output_norm, normalises it away).
CANDIDATE_FAULTS = ("reinit", "perturb", "explode_lr", "nan", "scale")

#: How much ``scale`` multiplies the embeddings by.
SCALE_FACTOR = 20.0

#: How much ``explode_lr`` multiplies the configured learning rate by.
EXPLODE_LR_FACTOR = 1000
#: Seed offset of the re-initialised model (``reinit``) and of the ``perturb`` noise: far from any run's seed.
FAULT_SEED_OFFSET = 1_000_003
#: ``perturb`` noise scale floor, so a constant tensor (std 0) is still moved.
PERTURB_MIN_STD = 1e-3


def check_fault(fault: str | None) -> None:
    """Raises ``ValueError`` for a fault name that is not in :data:`CANDIDATE_FAULTS`."""
    if fault and fault not in CANDIDATE_FAULTS:
        raise ValueError(f"unknown candidate_fault {fault!r}; known: {CANDIDATE_FAULTS}")


def inject_fault(model, fault: str, fresh_model: Callable[[], object]):
    """Applies a candidate fault after training; returns the model to export.

    Args:
        model: The trained ``SUMModel``.
        fault: One of :data:`CANDIDATE_FAULTS`.
        fresh_model: Builds a freshly initialised model (for ``reinit``).
    """
    import torch

    if fault == "reinit":
        return fresh_model()
    with torch.no_grad():
        if fault == "perturb":
            gen = torch.Generator().manual_seed(FAULT_SEED_OFFSET)
            for p in model.parameters():
                if p.numel() > 1:
                    p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp_min(PERTURB_MIN_STD))
        elif fault == "nan":
            next(iter(model.user_tower.parameters())).view(-1)[0] = float("nan")
        elif fault == "scale":
            model.user_tower.pyramid.output.weight.mul_(SCALE_FACTOR)  # the embeddings are linear in it
    return model
