"""Shared helpers of the model tests: a tiny spec, a tiny model config and synthetic frame builders.

Tests get everything through fixtures (``spec``, ``model_cfg``, ``train_cfg``, ``make_users``,
``make_examples``), never ``from conftest import ...``, which is ambiguous with several conftest files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sum_models.spec import FeatureSpec

TINY_SPEC = FeatureSpec(
    user_dense=("d0", "d1", "d2"),
    user_sparse={"pages": 50, "topics": 12},
    ad_dense=("ad_quality",),
    ad_sparse={"ad_id": 20, "ad_category": 4},
    labels=("click", "conversion"),
)
TINY_MODEL_CFG = {
    "num_embeddings": 2,
    "embedding_dim": 8,
    "sparse_pooling": "mean",
    "hidden_dim": 32,
    "mix_hidden_dim": 16,
}
TINY_TRAIN_CFG = {
    "batch_size": 128,
    "epochs": 4,
    "learning_rate": 0.01,
    "weight_decay": 0.0,
    "task_weights": {"click": 1.0, "conversion": 0.5},
}
# Users whose "pages" list holds one of these ids (after modulo) click much more often.
SIGNAL_PAGES = 10


def build_users(n_users: int, seed: int, spec: FeatureSpec = TINY_SPEC) -> pd.DataFrame:
    """Users-only frame: ``user_id``, dense floats, variable-length id lists (some empty, some ids >= hash)."""
    rng = np.random.default_rng(seed)
    data: dict[str, object] = {"user_id": np.arange(n_users, dtype=np.int64)}
    for name in spec.user_dense:
        data[name] = rng.normal(size=n_users).astype(np.float32)
    for name, hash_size in spec.user_sparse.items():
        lengths = rng.integers(0, 6, size=n_users)
        data[name] = [rng.integers(0, 2 * hash_size, size=n).astype(np.int64) for n in lengths]
    return pd.DataFrame(data)


def has_signal(users: pd.DataFrame) -> np.ndarray:
    """Whether each user's ``pages`` list contains a signal page (the label-generating feature)."""
    return np.array([bool(((np.asarray(p) % 50) < SIGNAL_PAGES).any()) for p in users["pages"]])


def build_examples(n_rows: int, seed: int, n_users: int = 300, spec: FeatureSpec = TINY_SPEC) -> pd.DataFrame:
    """Impressions joined with user features; click depends on the sparse ``pages`` feature."""
    rng = np.random.default_rng(seed + 1)
    users = build_users(n_users, seed, spec)
    rows = users.iloc[rng.integers(0, n_users, size=n_rows)].reset_index(drop=True)
    for name, card in spec.ad_sparse.items():
        rows[name] = rng.integers(0, card, size=n_rows).astype(np.int64)
    for name in spec.ad_dense:
        rows[name] = rng.normal(size=n_rows).astype(np.float32)
    logit = -2.5 + 3.0 * has_signal(rows)
    click = rng.random(n_rows) < 1.0 / (1.0 + np.exp(-logit))
    rows["click"] = click.astype(np.int64)
    rows["conversion"] = (click & (rng.random(n_rows) < 0.4)).astype(np.int64)
    return rows


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """Tiny tensors: one intra-op thread is faster than two on a shared machine (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def spec() -> FeatureSpec:
    return TINY_SPEC


@pytest.fixture
def model_cfg() -> dict:
    return dict(TINY_MODEL_CFG)


@pytest.fixture
def train_cfg() -> dict:
    return dict(TINY_TRAIN_CFG)


@pytest.fixture
def make_users():
    """The users-only frame builder: ``make_users(n_users, seed)``."""
    return build_users


@pytest.fixture
def make_examples():
    """The impressions frame builder: ``make_examples(n_rows, seed, n_users=300)``."""
    return build_examples


GOLDEN_DIR = __import__("pathlib").Path(__file__).parent / "golden"


@pytest.fixture
def golden(request):
    """``golden(name, tensor, atol=1e-5)``: compares a tensor with ``golden/<test module>.json[name]``.

    Run with ``SUM_UPDATE_GOLDEN=1`` to (re)write the stored values after a deliberate change of the
    architecture or its initialisation; the diff of the JSON file then shows what moved.
    """
    import json
    import os

    import torch

    path = GOLDEN_DIR / f"{request.module.__name__.rsplit('.', 1)[-1]}.json"
    update = os.environ.get("SUM_UPDATE_GOLDEN") == "1"

    def check(name: str, tensor, atol: float = 1e-5) -> None:
        values = tensor.detach().double().cpu()
        stored = json.loads(path.read_text()) if path.exists() else {}
        if update:
            stored[name] = {"shape": list(values.shape), "values": [round(v, 7) for v in values.flatten().tolist()]}
            GOLDEN_DIR.mkdir(exist_ok=True)
            path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
            return
        assert name in stored, f"no golden {name!r} in {path}; run with SUM_UPDATE_GOLDEN=1 to record it"
        want = torch.tensor(stored[name]["values"], dtype=torch.float64).view(stored[name]["shape"])
        torch.testing.assert_close(values, want, atol=atol, rtol=1e-4)

    return check


@pytest.fixture(scope="session")
def exported_snapshot(tmp_path_factory):
    """One snapshot (program included) of a tiny compact model, shared: export takes a few seconds.

    Returns:
        ``{"dir", "model", "spec", "cfg"}``; treat as read-only.
    """
    from sum_models.model import build_model
    from sum_models.snapshot import export_snapshot

    model = build_model(TINY_SPEC, TINY_MODEL_CFG, seed=0)
    out = export_snapshot(model, TINY_SPEC, TINY_MODEL_CFG, tmp_path_factory.mktemp("snap") / "s", "snap-x")
    return {"dir": out, "model": model, "spec": TINY_SPEC, "cfg": dict(TINY_MODEL_CFG)}
