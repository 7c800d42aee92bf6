"""Candidate faults for gate drills and the soak (the DAG's ``candidate_fault`` param); never set in normal runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from sum_pipeline.retrain_downstream import latest_before, load_downstream

#: reinit: export re-initialised weights; perturb: add noise as large as each weight tensor's spread;
#: explode_lr: train with a learning rate 1000x the configured one; nan: poison one weight with NaN; scale: the
#: trained tower's embeddings multiplied by SCALE_FACTOR (its output LC scaled: the directions stay, every
#: consumer's projection of them grows; a bounded tower, model.output_norm, normalises it away);
#: consumer_aimed_offset: version skew aimed where the consumers look -- every user's embedding k moved by one
#: constant vector along the direction the saved downstream models' projections ``sum_proj[k]`` amplify most (the
#: top right singular vector of their stacked weights: the workspace's latest with-SUM models saved before the day),
#: AIMED_OFFSET_SHARE of the candidate's mean norm of embedding k long, as long as a normal day's change, so the
#: cosine/L2 checks pass it (:func:`aim_offset`). Carried by the exported weights (a bias of the last Interaction
#: Module's MLP extractor, solved through the output LC; a bounded tower rescales it); with no saved consumer to
#: aim at, the train task fails.
CANDIDATE_FAULTS = ("reinit", "perturb", "explode_lr", "nan", "scale", "consumer_aimed_offset")

#: How much ``scale`` multiplies the embeddings by.
SCALE_FACTOR = 20.0

#: ``consumer_aimed_offset``'s length as a share of the candidate's mean norm of each embedding: the middle of the
#: normal days' relative L2 change in the gate calibration (0.154 .. 0.685, params.yaml ``gate``), i.e. no longer
#: than an ordinary day's change, only aimed. Not tuned to the drill's outcome. (The L2 check measures each user's
#: change of norm, which a mostly sideways offset moves less.)
AIMED_OFFSET_SHARE = 0.42

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


def inject_fault(model, fault: str, fresh_model: Callable[[], object], *,
                 users: Callable[[], Any] | None = None,
                 consumers: Callable[[], dict[str, list[Any]]] | None = None):
    """Applies a candidate fault after training; returns the model to export.

    Args:
        model: The trained ``SUMModel``.
        fault: One of :data:`CANDIDATE_FAULTS`.
        fresh_model: Builds a freshly initialised model (for ``reinit``).
        users: The day's training users' encoded features (``sum_models.data.UserInputs``), for
            ``consumer_aimed_offset``'s length.
        consumers: Per saved consumer, its ``sum_proj[k].weight`` for each k (:func:`consumer_projections`), for
            ``consumer_aimed_offset``'s direction.
    """
    import torch

    if fault == "reinit":
        return fresh_model()
    if fault == "consumer_aimed_offset":
        if users is None or consumers is None:
            raise ValueError("consumer_aimed_offset needs the day's users and the saved consumers to aim at")
        aim_offset(model.user_tower, users(), consumers(), AIMED_OFFSET_SHARE)
        return model
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


def consumer_projections(downstream_root: Path, ds: str, names: Sequence[str]) -> dict[str, list[Any]]:
    """The SUM projections of the latest with-SUM downstream models saved before ``ds`` (what the consumer check
    scores with): ``{name: [sum_proj[k].weight [P, D] for each k]}``.

    Raises:
        RuntimeError: No downstream model was saved before ``ds``: there is nothing to aim at.
    """
    out = {}
    for name in names:
        folder = latest_before(downstream_root / name / "with_sum", ds)
        if folder is not None:
            out[name] = [p.weight.detach().clone() for p in load_downstream(folder).sum_proj]
    if not out:
        raise RuntimeError(f"consumer_aimed_offset aims at the saved downstream models, and none of {list(names)} "
                           f"was saved under {downstream_root} before {ds}: run sum_downstream on an earlier day first")
    return out


def aim_offset(tower, users, projections: dict[str, list[Any]], share: float) -> list[float]:
    """Moves every user's embedding k by ``share * mean_norm_k * v_k``, ``v_k`` the top right singular vector of
    the consumers' stacked ``sum_proj[k].weight`` (the unit direction their projections amplify most).

    The tower's output is ``LC(X)`` with no bias, so the offset is written where it reaches the output linearly:
    the output bias of the MLP extractors of the last Interaction Module (their tokens enter only the output LC).
    With ``B`` those tokens' bias change and ``W_e`` the LC's columns for them, ``W_e B = offsets`` is solved by
    least squares (exact when there are at least K such tokens).

    Args:
        tower: The candidate's ``UserTower`` (changed in place).
        users: Encoded features of the users whose mean embedding norm sizes the offset.
        projections: :func:`consumer_projections`.
        share: The offset's length as a share of each embedding's mean norm.

    Returns:
        The offset's length per embedding.

    Raises:
        ValueError: The last Interaction Module has no MLP extractor, or the LC cannot carry the offset.
    """
    import torch

    from sum_models.extractors import MLPExtractor

    pyramid = tower.pyramid
    # The last module's tokens are its extractors' (in config order), then the dense tokens and the residual.
    first, slots = 0, []
    for extractor, cfg in zip(pyramid.blocks[-1].extractors, tower.arch["user_tower"][-1]["extractors"]):
        if isinstance(extractor, MLPExtractor):
            slots.append((first, extractor))
        first += int(cfg["tokens"])
    if not slots:
        raise ValueError("consumer_aimed_offset writes its offset into an MLP extractor of the user tower's last "
                         "Interaction Module, and the preset has none")
    k, d = tower.num_embeddings, tower.embedding_dim
    with torch.no_grad():
        was_training = tower.training
        tower.eval()
        emb = tower(users.dense, users.sparse_ids, users.sparse_offsets)  # [B, K, D]
        tower.train(was_training)
        lengths = [share * float(emb[:, j].norm(dim=1).mean()) for j in range(k)]
        target = torch.zeros(k, d)
        for j in range(k):
            stacked = torch.cat([w[j].to(torch.float32) for w in projections.values()])  # [sum P, D]
            direction = torch.linalg.svd(stacked, full_matrices=False).Vh[0]
            target[j] = lengths[j] * direction
        columns = torch.cat([pyramid.output.weight[:, s:s + e.tokens] for s, e in slots], dim=1)  # [K, T]
        bias = torch.linalg.lstsq(columns, target).solution  # [T, D]
        if not torch.allclose(columns @ bias, target, atol=1e-4 * max(lengths)):
            raise ValueError("the output LC cannot carry the aimed offset through the MLP extractors' tokens")
        row = 0
        for _, extractor in slots:
            out = [m for m in extractor.mlp.net if isinstance(m, torch.nn.Linear)][-1]
            out.bias.add_(bias[row:row + extractor.tokens].reshape(-1))
            row += extractor.tokens
    return lengths
