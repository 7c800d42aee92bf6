"""The params a test module runs under: written to a file of its own and made the params in force.

Modules with a layout of their own (the deployed stack, scale-out, MovieLens) build their params from the
project's or the session's and run the platform under them; ``SUM_PARAMS`` and ``SUM_WORKSPACE`` are restored
afterwards, so the next module runs under the session's params again.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from sum_platform.config import Params, load_params

__all__ = ["params_in_force"]


@contextmanager
def params_in_force(raw: dict, path: Path) -> Iterator[Params]:
    """Writes ``raw`` to ``path`` and makes it the params file in force (``SUM_PARAMS``; the workspace then comes
    from it, not ``SUM_WORKSPACE``) until the block ends.

    Yields:
        The loaded params.
    """
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    old = {k: os.environ.get(k) for k in ("SUM_PARAMS", "SUM_WORKSPACE")}
    os.environ["SUM_PARAMS"] = str(path)
    os.environ.pop("SUM_WORKSPACE", None)
    try:
        yield load_params()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
