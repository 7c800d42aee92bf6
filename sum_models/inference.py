"""Serving-side loading of an exported user tower, without the training code.

A snapshot's ``user_tower.pt2`` is a ``torch.export`` program of the user tower (graph + weights) whose
output is already fp16 (paper §5.3). This module needs only torch, the standard library and
:mod:`sum_models.spec`: none of the model, training or layer code is imported, so a serving process
can run a tower whose Python classes it does not have.

Why loading is safe here. ``torch.export.load`` is *not* safe on an untrusted file as such (its own docs
say so): a payload flagged ``use_pickle`` is read with ``torch.load(weights_only=False)``, the sample
inputs fall back to a full unpickle when the restricted one fails, custom/opaque objects are unpickled,
and ``ExportedProgram.module()`` ``exec``-s the archive's ``guards_code`` strings. Before anything is
deserialised, :func:`check_program_archive` therefore checks the archive itself and refuses it unless:

* every member is a known part of the format (no legacy pickled weight/constant files, no AOTI code);
* every weight/constant payload is raw tensor bytes (``use_pickle: false``), no custom/opaque objects;
* the sample inputs record is empty (the exporter saves none);
* every guard matches a strict shape-equation pattern (``L['dense'].size()[0] == L['x'][1].size()[0]``,
  or a comparison with an integer), so the ``exec`` only ever runs shape assertions;
* every graph node calls a ``torch.ops.aten`` operator;
* every symbolic size (parsed with ``sympy.sympify``, an ``eval``) is integer arithmetic on size symbols
  written with allow-listed sympy constructors only.

On top of that the snapshot manifest's sha256 of the file is verified first (the manifest is the trust
anchor of a snapshot, as for the safetensors weights).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any, List

import torch
from torch import Tensor

from sum_models.spec import FeatureSpec

__all__ = [
    "PROGRAM_FILE",
    "UnsafeProgramError",
    "check_program_archive",
    "load_program",
    "ExportedUserTower",
    "load_exported_tower",
    "file_sha256",
]

PROGRAM_FILE = "user_tower.pt2"

_GUARD_TERM = r"L\['[A-Za-z_][A-Za-z0-9_]*'\](?:\[\d+\])*\.size\(\)\[\d+\]"
_GUARD_RE = re.compile(rf"^(?:{_GUARD_TERM}|-?\d+) (?:==|>=|<=|<|>|!=) (?:{_GUARD_TERM}|-?\d+)$")
# Symbolic sizes are parsed with sympy.sympify (an eval): an expression may only be sympy's printed form of
# integer arithmetic on size symbols, e.g. "Mul(Integer(8), Symbol('s35', positive=True, integer=True))":
# allow-listed constructor names, integers, quoted symbol names, "(),= " and nothing else (no attribute
# access, subscripts, other strings or names), so the eval cannot reach anything but these constructors.
_EXPR_TOKEN_RE = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<int>-?\d+)|(?P<sym>'[a-z]+\d+')|(?P<punct>[(),=]))")
_EXPR_NAMES = frozenset(
    {"Symbol", "Integer", "Mul", "Add", "Pow", "Max", "Min", "FloorDiv", "CeilDiv", "Mod", "PythonMod",
     "CleanDiv", "FloorToInt", "CeilToInt", "positive", "nonnegative", "integer", "True", "False"}
)


def _safe_expr(expr: str) -> bool:
    pos = 0
    while pos < len(expr):
        match = _EXPR_TOKEN_RE.match(expr, pos)
        if match is None or match.end() == pos:
            return False
        if match.group("name") and match.group("name") not in _EXPR_NAMES:
            return False
        pos = match.end()
    return True


_ALLOWED_MEMBER_RE = re.compile(
    r"^[^/]+/(?:"
    r"data/weights/weight_\d+|data/weights/model_weights_config\.json|"
    r"data/constants/tensor_\d+|data/constants/model_constants_config\.json|"
    r"models/model\.json|data/sample_inputs/model\.pt|"
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
    r"extra/[A-Za-z0-9_.-]+"
    r")$"
)


class UnsafeProgramError(RuntimeError):
    """An exported program archive holds something that could run code when loaded."""


def _collect(obj: Any, key: str, out: set) -> None:
    """Every string value stored under ``key`` anywhere in a JSON tree."""
    if isinstance(obj, dict):
        value = obj.get(key)
        if isinstance(value, str):
            out.add(value)
        for child in obj.values():
            _collect(child, key, out)
    elif isinstance(obj, list):
        for child in obj:
            _collect(child, key, out)


def check_program_archive(path: Path) -> None:
    """Refuses a ``.pt2`` archive that could execute code on load (see the module docstring).

    Args:
        path: The archive.

    Raises:
        UnsafeProgramError: The archive is not a plain aten-only program with raw tensor weights.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UnsafeProgramError(f"{path} is not a readable program archive: {exc}") from exc
    with archive:
        names = [info.filename for info in archive.infolist()]
        if len(set(names)) != len(names):
            # zipfile reads the last of two same-named members, torch's reader may take the first: refuse both.
            dup = sorted({n for n in names if names.count(n) > 1})
            raise UnsafeProgramError(f"{path}: duplicate archive members {dup[:3]}")
        infos = {info.filename: info for info in archive.infolist()}
        for name in infos:
            if not _ALLOWED_MEMBER_RE.match(name):
                raise UnsafeProgramError(f"{path}: unexpected archive member {name!r}")

        def member(suffix: str) -> str:
            found = [n for n in infos if n.split("/", 1)[-1] == suffix]
            if len(found) != 1:
                raise UnsafeProgramError(f"{path}: expected one {suffix!r}, found {len(found)}")
            return found[0]

        for config_name in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
            config = json.loads(archive.read(member(config_name)))
            for fqn, meta in (config.get("config") or {}).items():
                if meta.get("use_pickle", True) or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise UnsafeProgramError(f"{path}: payload {fqn!r} is not raw tensor bytes")
        samples = [n for n in infos if n.endswith("data/sample_inputs/model.pt")]
        if any(infos[n].file_size for n in samples):
            raise UnsafeProgramError(f"{path}: sample inputs are pickled; the exporter never saves them")
        program = json.loads(archive.read(member("models/model.json")))
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _GUARD_RE.match(guard):
            raise UnsafeProgramError(f"{path}: guard {guard!r} is not a plain shape assertion")
    graph = program.get("graph_module", {}).get("graph", {})
    if graph.get("custom_obj_values"):
        raise UnsafeProgramError(f"{path}: the graph holds custom objects")
    targets: set = set()
    _collect(graph.get("nodes", []), "target", targets)
    bad = sorted(t for t in targets if not t.startswith("torch.ops.aten."))
    if bad:
        raise UnsafeProgramError(f"{path}: the graph calls non-aten operators {bad}")
    exprs: set = set()
    _collect(program, "expr_str", exprs)
    bad = sorted(e for e in exprs if not _safe_expr(e))
    if bad:
        raise UnsafeProgramError(f"{path}: symbolic sizes {bad[:3]} are not plain integer arithmetic on size symbols")


def load_program(path: Path) -> torch.export.ExportedProgram:
    """Checks then loads an exported program (see :func:`check_program_archive`).

    Args:
        path: A ``.pt2`` archive written by :func:`sum_models.snapshot.export_snapshot`.

    Returns:
        The exported program.

    Raises:
        UnsafeProgramError: The archive failed the safety checks.
    """
    check_program_archive(Path(path))
    return torch.export.load(str(path))


class ExportedUserTower:
    """An exported user tower with the attributes serving uses (``spec``, K, D, snapshot id).

    A plain callable, not an ``nn.Module``: an exported program has no train/eval modes (it is always
    in inference mode; :meth:`eval` is a no-op kept for duck-typing with the eager tower).

    Args:
        program: The loaded program.
        spec: The tower's input spec.
        num_embeddings: K.
        embedding_dim: D.
        snapshot_id: Id of the snapshot it came from.
    """

    training = False

    def __init__(
        self,
        program: torch.export.ExportedProgram,
        spec: FeatureSpec,
        num_embeddings: int,
        embedding_dim: int,
        snapshot_id: str = "",
    ) -> None:
        self.program = program
        self._module = program.module()
        self.spec = spec
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.snapshot_id = snapshot_id

    def eval(self) -> "ExportedUserTower":
        """No-op (an exported program is always in inference mode)."""
        return self

    def __call__(self, dense: Tensor, sparse_ids: List[Tensor], sparse_offsets: List[Tensor]) -> Tensor:
        """Computes the SUM user embeddings.

        Args:
            dense: float32 ``[B, N_dense_features]``.
            sparse_ids: ``N_sparse`` int64 1-D tensors (already modulo hash size).
            sparse_offsets: ``N_sparse`` int64 ``[B]``.

        Returns:
            float16 ``[B, K, D]``.
        """
        return self._module(dense, list(sparse_ids), list(sparse_offsets))

    forward = __call__


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks (the checksums of a snapshot's manifest)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def load_exported_tower(snapshot_dir: Path) -> ExportedUserTower:
    """Loads a snapshot's exported user tower after verifying its checksum and its safety.

    Args:
        snapshot_dir: A snapshot directory (``manifest.json``, ``config.json``, ``user_tower.pt2``).

    Returns:
        The tower (fp16 output).

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The manifest has no checksum for the program, or a checksum does not match.
        UnsafeProgramError: The archive failed the safety checks.
    """
    snapshot_dir = Path(snapshot_dir)
    manifest = json.loads((snapshot_dir / "manifest.json").read_text())
    sums = manifest.get("sha256") or {}
    for name in (PROGRAM_FILE, "config.json"):
        if name not in sums:
            raise ValueError(f"manifest of {snapshot_dir} has no checksum for {name}")
        actual = file_sha256(snapshot_dir / name)
        if actual != sums[name]:
            raise ValueError(f"{snapshot_dir / name} is corrupt: sha256 {actual} != manifest {sums[name]}")
    config = json.loads((snapshot_dir / "config.json").read_text())
    spec = FeatureSpec.from_dict(config["spec"])
    model = config["model"]
    program = load_program(snapshot_dir / PROGRAM_FILE)
    tower = ExportedUserTower(
        program, spec, model["num_embeddings"], model["embedding_dim"], str(manifest.get("snapshot_id", ""))
    )
    return tower
