"""Fixtures shared by the integration tests (session-wide ones are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def module_workspace(request, session_dir: Path):
    """A workspace of the test module's own (``SUM_WORKSPACE``), restored afterwards.

    The folder name comes from the module's ``WORKSPACE_NAME``.
    """
    ws = session_dir / getattr(request.module, "WORKSPACE_NAME", request.module.__name__)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUM_WORKSPACE", str(ws))
        yield ws


@pytest.fixture(scope="session")
def stored_rows():
    """``stored_rows(user_ids)``: the served rows of the workspace in force, arrays as nested lists (so two
    reads compare with ``==``)."""
    import numpy as np

    from serving.store_io import read_embeddings
    from sum_platform.config import load_params
    from sum_platform.feature_store import get_store

    def read(user_ids) -> dict:
        stored = read_embeddings(get_store(load_params()), user_ids)
        return {uid: {**row, "embeddings": np.asarray(row["embeddings"]).tolist()} for uid, row in stored.items()}

    return read
