"""The exported user tower (torch.export program in the snapshot): equal to eager within fp16, loadable
without the training code, refused when it could run code, byte-deterministic; FLOPs in the manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sum_models.data import encode_users
from sum_models.flops import model_flops
from sum_models.inference import PROGRAM_FILE, UnsafeProgramError, check_program_archive, load_exported_tower
from sum_models.snapshot import embed_users, export_snapshot

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def snapshot(exported_snapshot):
    return exported_snapshot


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_exported_tower_equals_eager_within_fp16(snapshot, make_users):
    tower = load_exported_tower(snapshot["dir"])
    assert tower.snapshot_id == "snap-x" and tower.spec == snapshot["spec"]
    users = make_users(40, seed=7)  # variable-length bags, some empty
    got = embed_users(tower, users, tower.spec, batch_size=16)  # batches of 16, 16, 8
    u = encode_users(users, snapshot["spec"])
    with torch.no_grad():
        eager = snapshot["model"].user_tower(u.dense, u.sparse_ids, u.sparse_offsets).numpy()
    assert got.dtype == np.float16 and got.shape == eager.shape == (40, 2, 8)
    np.testing.assert_allclose(got.astype(np.float32), eager, rtol=1e-3, atol=1e-3)  # fp16 rounding
    assert _cosine(got, eager).min() >= 0.999  # fp16 round trip keeps the direction


def test_exported_program_outputs_fp16_for_any_batch_and_bag_sizes(snapshot, make_users):
    tower = load_exported_tower(snapshot["dir"])
    for n in (1, 2, 33):
        u = encode_users(make_users(n, seed=n), snapshot["spec"])
        out = tower(u.dense, u.sparse_ids, u.sparse_offsets)
        assert out.dtype == torch.float16 and out.shape == (n, 2, 8)
    empty = encode_users(make_users(3, seed=0).assign(pages=[[], [], []], topics=[[], [], []]), snapshot["spec"])
    assert tower(empty.dense, empty.sparse_ids, empty.sparse_offsets).shape == (3, 2, 8)


def test_fp16_round_trip_keeps_cosine_on_a_trained_scale(snapshot, make_users):
    """fp16 storage (paper §5.3) on embeddings of realistic magnitude: cosine >= 0.999 per user."""
    u = encode_users(make_users(200, seed=3), snapshot["spec"])
    with torch.no_grad():
        for scale in (0.01, 1.0, 100.0):
            emb = snapshot["model"].user_tower(u.dense, u.sparse_ids, u.sparse_offsets) * scale
            half = emb.to(torch.float16).float()
            assert _cosine(half.numpy(), emb.numpy()).min() >= 0.999


def test_program_loads_and_runs_without_the_training_code(snapshot):
    """A fresh interpreter that cannot import the model, layers or training modules still serves."""
    blocked = ["model", "user_tower", "mix_tower", "extractors", "interaction", "layers", "train", "snapshot",
               "presets", "loss", "baselines", "flops"]
    code = f"""
import importlib.abc, sys
BLOCKED = {{"sum_models." + m for m in {blocked!r}}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in BLOCKED:
            raise ImportError("training code is not available: " + name)
sys.meta_path.insert(0, Block())
import torch
from sum_models.inference import load_exported_tower
tower = load_exported_tower({str(snapshot["dir"])!r})
dense = torch.zeros(2, len(tower.spec.user_dense))
ids = [torch.tensor([1, 2, 3]) for _ in tower.spec.user_sparse]
offsets = [torch.tensor([0, 1]) for _ in tower.spec.user_sparse]
out = tower(dense, ids, offsets)
assert out.shape == (2, tower.num_embeddings, tower.embedding_dim) and out.dtype == torch.float16
assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_manifest_records_flops_parameters_and_checksums(snapshot):
    manifest = json.loads((snapshot["dir"] / "manifest.json").read_text())
    counts = model_flops(snapshot["model"])
    assert manifest["flops_per_user"] == counts["user_tower"] > 0
    assert manifest["flops"] == counts
    assert manifest["preset"] == "compact"
    assert manifest["parameters"]["user_tower"]["total"] == sum(
        p.numel() for p in snapshot["model"].user_tower.parameters()
    )
    assert set(manifest["sha256"]) == {"user_tower.safetensors", "model.safetensors", "config.json", PROGRAM_FILE}
    config = json.loads((snapshot["dir"] / "config.json").read_text())
    assert config["model"]["user_tower"] == snapshot["model"].config["user_tower"]  # the resolved architecture


def test_snapshot_bytes_are_identical_on_re_export(snapshot, tmp_path):
    again = export_snapshot(snapshot["model"], snapshot["spec"], snapshot["cfg"], tmp_path / "again", "snap-x")
    for name in ("user_tower.safetensors", "model.safetensors", "config.json", PROGRAM_FILE):
        first = hashlib.sha256((snapshot["dir"] / name).read_bytes()).hexdigest()
        assert hashlib.sha256((again / name).read_bytes()).hexdigest() == first, name


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copies a .pt2 archive, passing every member's (name, bytes) through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name, data = edit(info.filename, zin.read(info.filename))
            zout.writestr(name, data)
    return dst


def _json_edit(suffix: str, change):
    def edit(name, data):
        if name.endswith(suffix):
            obj = json.loads(data)
            change(obj)
            return name, json.dumps(obj).encode()
        return name, data

    return edit


def test_archive_that_could_run_code_is_refused(snapshot, tmp_path):
    src = snapshot["dir"] / PROGRAM_FILE
    check_program_archive(src)  # the exporter's own archive passes

    def evil_guard(obj):
        obj["guards_code"] = ["__import__('os').system('touch /tmp/pwned')"]

    def pickled_weight(obj):
        next(iter(obj["config"].values()))["use_pickle"] = True

    def evil_size(obj):
        values = obj["graph_module"]["graph"]["tensor_values"]
        sized = next(v for v in values.values() if any("as_expr" in d for d in v.get("sizes", [])))
        next(d for d in sized["sizes"] if "as_expr" in d)["as_expr"]["expr_str"] = "__import__('os').getpid()"

    def foreign_op(obj):
        obj["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.eval"

    cases = {
        "guard": _json_edit("models/model.json", evil_guard),
        "pickle": _json_edit("model_weights_config.json", pickled_weight),
        "op": _json_edit("models/model.json", foreign_op),
        "size": _json_edit("models/model.json", evil_size),
        "samples": lambda n, d: (n, b"\x80\x02}q\x00." if n.endswith("sample_inputs/model.pt") else d),
        "member": lambda n, d: (n.replace("data/weights/weight_0", "data/weights/model.pt") if n.endswith("weight_0") else n, d),
    }
    for case, edit in cases.items():
        bad = _rewrite(src, tmp_path / f"{case}.pt2", edit)
        with pytest.raises(UnsafeProgramError):
            check_program_archive(bad)
    # Two members of one name: zipfile reads the last, torch's reader may read the first (a parser differential).
    dup = tmp_path / "duplicate.pt2"
    shutil.copyfile(src, dup)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dup, "a") as zout, pytest.warns(UserWarning, match="Duplicate"):
        name = next(n for n in zin.namelist() if n.endswith("models/model.json"))
        zout.writestr(name, zin.read(name))
    with pytest.raises(UnsafeProgramError, match="duplicate archive members"):
        check_program_archive(dup)


def test_tampered_program_fails_its_checksum(snapshot, tmp_path):
    import shutil

    copy = tmp_path / "snap"
    shutil.copytree(snapshot["dir"], copy)
    data = bytearray((copy / PROGRAM_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / PROGRAM_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_exported_tower(copy)
