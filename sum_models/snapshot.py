"""Model snapshots: export, verified loading, and batch user-embedding inference.

A snapshot is a directory of five files::

    user_tower.safetensors   user tower weights only (what serving loads, paper §4)
    user_tower.pt2           the user tower as a torch.export program (graph + weights, fp16 output), for
                             inference without the training code (see sum_models.inference)
    model.safetensors        the whole model (user + mix tower), for warm-starting the next day's training
    config.json              {"format_version", "spec": FeatureSpec.to_dict(), "model": resolved architecture}
    manifest.json            {"snapshot_id", "created_at", "torch_version", "sha256": {file: hex}, "preset",
                              "flops_per_user", "flops", "parameters", "extra", ...}

Weights are stored with safetensors (no pickle is ever loaded); the program archive is checked before it is
deserialised (:func:`sum_models.inference.check_program_archive`). Every load verifies every checksum in
the manifest and raises :class:`SnapshotError` on a missing or corrupt file. Embeddings leave the tower as
fp16 (paper §5.3).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from sum_models import atomic
from sum_models.data import UserInputs, encode_users, finite_rows
from sum_models.flops import model_flops, parameter_counts, synthetic_user_batch
from sum_models.inference import PROGRAM_FILE, file_sha256
from sum_models.model import SUMModel, check_spec, model_config_dict
from sum_models.presets import ARCH_KEYS
from sum_models.spec import FeatureSpec
from sum_models.user_tower import UserTower

__all__ = [
    "SnapshotError",
    "USER_TOWER_FILE",
    "PROGRAM_FILE",
    "MODEL_FILE",
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "FORMAT_VERSION",
    "export_snapshot",
    "export_program",
    "verify_snapshot",
    "load_user_tower",
    "load_model",
    "embed_users",
    "embed_users_finite",
    "embed_user_rows_finite",
    "skipped_users",
    "embed_inputs",
]

USER_TOWER_FILE = "user_tower.safetensors"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 1 = the walking skeleton's flat tower (not loadable any more: retrain)
_CHECKSUMMED = (USER_TOWER_FILE, MODEL_FILE, CONFIG_FILE)  # always present; PROGRAM_FILE when exported
_Module = TypeVar("_Module", bound=torch.nn.Module)


class SnapshotError(RuntimeError):
    """A snapshot directory is missing, incomplete, corrupt or inconsistent."""


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _write_json(path: Path, obj: Any) -> None:
    # No sort_keys: the order of the spec's dicts is the order of the embedding tables.
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


class _Fp16Output(torch.nn.Module):
    """The user tower with its embeddings cast to fp16 inside the graph (paper §5.3)."""

    def __init__(self, tower: UserTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, dense: torch.Tensor, sparse_ids: list[torch.Tensor], sparse_offsets: list[torch.Tensor]) -> torch.Tensor:
        """``[B, N_dense]``, ``N_sparse`` ids / ``[B]`` offsets -> float16 ``[B, K, D]``."""
        return self.tower(dense, sparse_ids, sparse_offsets).to(torch.float16)


def export_program(tower: UserTower, path: Path) -> Path:
    """Exports the user tower with ``torch.export`` (dynamic batch and id counts) and saves it.

    The program holds only aten operators and raw tensor bytes; sample inputs are not saved (they would be
    pickled), so :func:`sum_models.inference.load_program` accepts it. Saving is byte-deterministic for
    identical weights.

    Args:
        tower: The user tower (put in eval mode for the export, its mode restored afterwards).
        path: Output ``.pt2`` file.

    Returns:
        ``path``.
    """
    from torch.export import Dim

    spec = tower.spec
    dense, ids, offsets = synthetic_user_batch(spec, batch_size=3, ids_per_feature=2)
    batch = Dim("batch", min=1)
    dynamic = (
        {0: batch},
        [{0: Dim(f"ids_{i}", min=0)} for i in range(len(ids))],
        [{0: batch} for _ in offsets],
    )
    was_training = tower.training
    tower.eval()
    try:
        program = torch.export.export(_Fp16Output(tower), (dense, ids, offsets), dynamic_shapes=dynamic, strict=False)
    finally:
        tower.train(was_training)
    program.example_inputs = None  # never pickle sample inputs into the archive
    torch.export.save(program, str(path))
    return Path(path)


def export_snapshot(
    model: SUMModel,
    spec: FeatureSpec,
    model_cfg: Any,
    out_dir: Path,
    snapshot_id: str,
    extra: dict | None = None,
    *,
    program: bool = True,
) -> Path:
    """Writes a snapshot directory atomically.

    Files are written into a temporary directory beside ``out_dir`` and moved into place, so readers never
    see a partial snapshot and exporting the same directory twice replaces it.

    Args:
        model: The trained model.
        spec: Its input spec (must equal ``model.spec``).
        model_cfg: Its model config (``params.model`` or a dict; must match the model's architecture).
        out_dir: The snapshot directory to create or replace.
        snapshot_id: Id recorded in the manifest (and the safetensors metadata).
        extra: JSON-serialisable extra fields for the manifest (lineage, NE, ...).
        program: Also write ``user_tower.pt2`` (the exported tower; ~1-3 s).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``spec`` or ``model_cfg`` do not match the model.
    """
    out_dir = Path(out_dir)
    cfg = model_config_dict(model_cfg)
    if spec != model.spec:
        raise ValueError(f"spec {spec} does not match the model's spec {model.spec}")
    mismatched = {k: (cfg[k], model.config[k]) for k in ARCH_KEYS if cfg[k] != model.config[k]}
    if mismatched:
        raise ValueError(f"model_cfg does not match the model (given, actual): {mismatched}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic.recover(out_dir)  # what a killed export of this snapshot left behind
    tmp = atomic.temp_sibling(out_dir)
    tmp.mkdir()
    os.chmod(tmp, 0o755)  # readable by the serving user, whatever the umask
    try:
        # One metadata key: safetensors writes a multi-key dict in hash order, which varies between
        # processes and would make identical weights differ byte for byte (and so in DVC and checksums).
        meta = {"sum": json.dumps({"format_version": str(FORMAT_VERSION), "snapshot_id": str(snapshot_id)}, sort_keys=True)}
        save_file(_tensors(model.user_tower.state_dict()), str(tmp / USER_TOWER_FILE), metadata=meta)
        save_file(_tensors(model.state_dict()), str(tmp / MODEL_FILE), metadata=meta)
        _write_json(tmp / CONFIG_FILE, {"format_version": FORMAT_VERSION, "spec": spec.to_dict(), "model": cfg})
        files = list(_CHECKSUMMED)
        if program:
            export_program(model.user_tower, tmp / PROGRAM_FILE)
            files.append(PROGRAM_FILE)
        flops = model_flops(model, spec)
        manifest = {
            "format_version": FORMAT_VERSION,
            "snapshot_id": str(snapshot_id),
            "created_at": datetime.now(timezone.utc).isoformat(),
            "torch_version": torch.__version__,
            "num_embeddings": int(cfg["num_embeddings"]),
            "embedding_dim": int(cfg["embedding_dim"]),
            "embedding_dtype": "float16",
            "preset": cfg["preset"],
            "flops_per_user": flops["user_tower"],  # user tower inference, per user (paper: 390M / 20M)
            "flops": flops,
            "parameters": {"user_tower": parameter_counts(model.user_tower), "model": parameter_counts(model)},
            "sha256": {name: file_sha256(tmp / name) for name in files},
            "extra": dict(extra or {}),
        }
        _write_json(tmp / MANIFEST_FILE, manifest)
        atomic.replace_path(tmp, out_dir)  # fsynced, then swapped in: a kill leaves the old snapshot or the new
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SnapshotError(f"snapshot file {path} is missing")
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot file {path} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SnapshotError(f"snapshot file {path} must hold a JSON object")
    return obj


def verify_snapshot(snapshot_dir: Path) -> tuple[dict, dict]:
    """Checks a snapshot's files against its manifest.

    Args:
        snapshot_dir: A directory written by :func:`export_snapshot`.

    Returns:
        ``(manifest, config)`` dicts.

    Raises:
        SnapshotError: Directory, manifest or a file missing; a checksum mismatch; unreadable JSON.
    """
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        raise SnapshotError(f"snapshot directory {snapshot_dir} does not exist")
    manifest = _read_json(snapshot_dir / MANIFEST_FILE)
    sums = manifest.get("sha256")
    if not isinstance(sums, dict) or any(name not in sums for name in _CHECKSUMMED):
        raise SnapshotError(f"manifest of {snapshot_dir} lacks checksums for {list(_CHECKSUMMED)}")
    for name, expected in sums.items():
        path = snapshot_dir / name
        if not path.is_file():
            raise SnapshotError(f"snapshot file {path} is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise SnapshotError(f"snapshot file {path} is corrupt: sha256 {actual} != manifest {expected}")
    config = _read_json(snapshot_dir / CONFIG_FILE)
    if config.get("format_version") != FORMAT_VERSION:
        hint = " (written by the walking skeleton's flat tower: retrain, e.g. sumctl run --fresh)" if config.get(
            "format_version") == 1 else ""
        raise SnapshotError(f"unsupported snapshot format {config.get('format_version')!r} in {snapshot_dir}{hint}")
    return manifest, config


def _spec_and_cfg(config: dict, snapshot_dir: Path) -> tuple[FeatureSpec, dict]:
    try:
        return FeatureSpec.from_dict(config["spec"]), model_config_dict(config["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"config of {snapshot_dir} is malformed: {exc}") from exc


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise SnapshotError(f"cannot read weights {path}: {exc}") from exc
    try:
        result = module.load_state_dict(state, strict=False)  # a shape mismatch still raises
    except RuntimeError as exc:
        raise SnapshotError(f"weights {path} do not match the configured architecture: {exc}") from exc
    # A snapshot exported before dense normalisation existed has no statistics: its features stay
    # unnormalised (the buffers' defaults), which is what it was trained with. Every other key must match.
    missing = [k for k in result.missing_keys if not _is_normalizer_key(k)]
    if missing or result.unexpected_keys:
        raise SnapshotError(f"weights {path} do not match the configured architecture: missing {missing}, "
                            f"unexpected {result.unexpected_keys}")


def _is_normalizer_key(key: str) -> bool:
    return ".dense_norm." in f".{key}"


def _load(snapshot_dir: Path, build: Callable[[FeatureSpec, dict], _Module], weights_file: str) -> tuple[_Module, dict]:
    """Verifies a snapshot, builds ``build(spec, cfg)`` from its config and loads ``weights_file`` into it."""
    snapshot_dir = Path(snapshot_dir)
    manifest, config = verify_snapshot(snapshot_dir)
    spec, cfg = _spec_and_cfg(config, snapshot_dir)
    module = build(spec, cfg)
    _load_weights(module, snapshot_dir / weights_file)
    return module, manifest


def load_user_tower(snapshot_dir: Path) -> tuple[UserTower, dict]:
    """Loads the serving part of a snapshot after verifying every checksum.

    Args:
        snapshot_dir: A directory written by :func:`export_snapshot`.

    Returns:
        ``(tower, manifest)``: the user tower in eval mode and the manifest dict (the spec is available as
        ``tower.spec``).

    Raises:
        SnapshotError: A file is missing or corrupt, or the weights do not fit the config.
    """
    tower, manifest = _load(snapshot_dir, UserTower, USER_TOWER_FILE)
    return tower.eval(), manifest


def load_model(snapshot_dir: Path) -> tuple[SUMModel, dict]:
    """Loads the whole model of a snapshot (warm start) after verifying every checksum.

    Args:
        snapshot_dir: A directory written by :func:`export_snapshot`.

    Returns:
        ``(model, manifest)``; ``model.spec`` and ``model.config`` hold the snapshot's spec and config.

    Raises:
        SnapshotError: A file is missing or corrupt, or the weights do not fit the config.
    """
    return _load(snapshot_dir, SUMModel, MODEL_FILE)


def embed_users(tower: UserTower, users_df: pd.DataFrame, spec: FeatureSpec, batch_size: int = 2048) -> np.ndarray:
    """Computes SUM user embeddings for a frame of users.

    Args:
        tower: A user tower: eager (:func:`load_user_tower`) or exported (:func:`sum_models.inference.load_exported_tower`).
        users_df: ``user_id`` + user feature columns (one row per user; other columns ignored).
        spec: The tower's input spec.
        batch_size: Users per forward pass.

    Returns:
        float16 ``[N, K, D]`` in the row order of ``users_df``.

    Raises:
        ValueError: Bad feature values, or embeddings that overflow fp16.
        SpecMismatchError: ``spec``'s user features differ from ``tower.spec``'s (pass ``tower.spec``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_spec(getattr(tower, "spec", None), spec, user_only=True)
    k, d = int(tower.num_embeddings), int(tower.embedding_dim)
    out = np.empty((len(users_df), k, d), dtype=np.float16)
    for s in range(0, len(users_df), batch_size):
        inputs = encode_users(users_df.iloc[s : s + batch_size], spec)
        out[s : s + len(inputs)] = embed_inputs(tower, inputs, check=False)
    if not np.isfinite(out).all():
        raise ValueError("user embeddings overflow float16 (|value| > 65504) or are NaN")
    return out


def embed_users_finite(
    tower: UserTower, users_df: pd.DataFrame, spec: FeatureSpec, batch_size: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`embed_users` that skips, instead of failing on, users with non-finite inputs or embeddings.

    One user's bad value (a feature at 1e12 overflows the tower) must not cost the other users of a batch their
    embeddings; the caller counts and reports the skipped ones. Rows are taken in blocks of ``batch_size`` as
    :func:`embed_users` takes them (only the block's good rows go through the tower), so a frame without a bad
    row gets exactly :func:`embed_users`' values, and any caller cutting the same blocks the same values.

    Returns:
        ``(embeddings, skipped)``: float16 ``[N, K, D]`` in row order (NaN for skipped users) and, per row, ``""``
        or why it was skipped: ``nonfinite_features`` (a dense input not finite in float32) or
        ``nonfinite_embedding`` (a value of its embedding not finite in fp16).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_spec(getattr(tower, "spec", None), spec, user_only=True)
    k, d = int(tower.num_embeddings), int(tower.embedding_dim)
    inputs_ok = finite_rows(users_df, spec.user_dense)
    out = np.full((len(users_df), k, d), np.nan, dtype=np.float16)
    for s in range(0, len(users_df), batch_size):
        part = s + np.flatnonzero(inputs_ok[s : s + batch_size])
        if part.size:
            with np.errstate(over="ignore", invalid="ignore"):
                out[part] = embed_inputs(tower, encode_users(users_df.iloc[part], spec), check=False)
    return out, _skip_reasons(out, inputs_ok)


def embed_user_rows_finite(
    tower: UserTower, rows: list[dict[str, Any]], batch_size: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`embed_users_finite` for feature rows as the online store holds them (serving: a few users, no frame;
    :func:`sum_models.data.encode_user_rows`).

    Returns:
        ``(embeddings, skipped)`` as :func:`embed_users_finite` gives them.
    """
    from sum_models.data import encode_user_rows, user_row_is_finite

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k, d = int(tower.num_embeddings), int(tower.embedding_dim)
    inputs_ok = np.fromiter((user_row_is_finite(r, tower.spec) for r in rows), dtype=bool, count=len(rows))
    out = np.full((len(rows), k, d), np.nan, dtype=np.float16)
    for s in range(0, len(rows), batch_size):
        part = s + np.flatnonzero(inputs_ok[s : s + batch_size])
        if part.size:
            with np.errstate(over="ignore", invalid="ignore"):
                out[part] = embed_inputs(tower, encode_user_rows([rows[i] for i in part], tower.spec), check=False)
    return out, _skip_reasons(out, inputs_ok)


def _skip_reasons(out: np.ndarray, inputs_ok: np.ndarray) -> np.ndarray:
    skipped = np.full(len(out), "", dtype=object)
    skipped[~np.isfinite(out).all(axis=(1, 2))] = "nonfinite_embedding"
    skipped[~inputs_ok] = "nonfinite_features"
    return skipped


def skipped_users(user_ids: Any, skipped: np.ndarray, examples: int = 5) -> dict[str, dict[str, Any]]:
    """``{reason: {"count", "users": the first few ids}}`` of :func:`embed_users_finite`'s skipped rows."""
    ids = np.asarray(user_ids)
    out: dict[str, dict[str, Any]] = {}
    for reason in sorted({r for r in skipped if r}):
        hit = ids[skipped == reason]
        out[reason] = {"count": int(hit.size), "users": [int(u) for u in hit[:examples]]}
    return out


def embed_inputs(tower: UserTower, inputs: UserInputs, check: bool = True) -> np.ndarray:
    """SUM user embeddings of encoded inputs, in one forward pass (serving: a few users, no frame).

    Args:
        tower: A user tower (see :func:`embed_users`).
        inputs: ``B`` users' encoded features (:func:`sum_models.data.encode_user_rows`).
        check: Raise if an embedding overflows fp16 or is NaN.

    Returns:
        float16 ``[B, K, D]`` (paper §5.3: embeddings are stored and served in fp16).
    """
    with torch.inference_mode():
        emb = tower(inputs.dense, inputs.sparse_ids, inputs.sparse_offsets)  # [B, K, D] fp32
        out = emb.to(torch.float16).numpy()  # beyond fp16's range: inf, caught below or by the caller
    if check and not np.isfinite(out).all():
        raise ValueError("user embeddings overflow float16 (|value| > 65504) or are NaN")
    return out
