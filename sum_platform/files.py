"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every writer in the project goes through :func:`replace_atomically` (a temporary sibling, fsynced, then swapped in
by :func:`sum_models.atomic.replace_path`: a rename for a file, an atomic exchange for a folder), so a task killed
at any point - even by SIGKILL - leaves the old content or the new at the path, and a rerun replaces it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from sum_models import atomic

if TYPE_CHECKING:
    import pandas as pd


@contextmanager
def replace_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``path``; on success it replaces ``path`` (a file or a folder).

    The temporary name starts with a dot, so readers of a folder's ``*.parquet`` / ``ds=*`` never pick it up.
    On an exception the temporary is removed and ``path`` is left as it was; after a SIGKILL the next replace of
    ``path`` finishes or removes what was left (:func:`sum_models.atomic.recover`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.recover(path)  # what a killed replace of this path left behind
    tmp = atomic.temp_sibling(path)
    try:
        yield tmp
        atomic.replace_path(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created if needed, its folder too) for the block: one holder
    at a time across the machine's processes; the OS releases it if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_json(path: Path, payload: Mapping[str, Any], sort_keys: bool = True) -> Path:
    """Writes ``payload`` as indented JSON atomically; returns ``path``.

    Keys are sorted unless ``sort_keys=False``: a payload whose dict order means something (a feature
    spec: the order of the embedding tables) keeps its order.
    """
    with replace_atomically(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=sort_keys, default=str))
    return path


def owner_only_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in ``path``, generated once by ``make`` into a file only its owner can read (0600).

    Written atomically (a half-written secret would lock the stack out); a looser mode found later is
    tightened with a warning.
    """
    path = Path(path)
    if not path.exists():
        with replace_atomically(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(make().strip() + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logging.getLogger(__name__).warning("%s had mode %o; set to 0600", path, mode)
        path.chmod(0o600)
    return path.read_text().strip()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_parquet(frame: "pd.DataFrame", path: Path) -> Path:
    """Writes one parquet file atomically (no index); returns ``path``."""
    with replace_atomically(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def write_partition(frame: "pd.DataFrame", folder: Path) -> Path:
    """Writes ``frame`` as ``folder/part-0.parquet``, replacing the folder's old content atomically."""
    with replace_atomically(folder) as tmp:
        tmp.mkdir()
        frame.to_parquet(tmp / "part-0.parquet", index=False)
    return folder


NO_SPACE = "No space left on device"  # strerror(ENOSPC), also in the messages of tools and Rust libraries (safetensors)


def _free(path: Path) -> str:
    """``"<free> free of <total> on <path's filesystem>"`` for the nearest existing folder of ``path``."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB at {path}"


def disk_full(error: BaseException | str, path: Path, what: str) -> OSError | None:
    """An ``OSError(ENOSPC)`` that says what ran out of space, or None when ``error`` is not a full disk.

    ``error`` is an exception (an ``OSError`` with errno ENOSPC, or any exception whose message says so: safetensors
    and subprocesses report it in text) or a tool's output; ``path`` is where the writing went, ``what`` the work
    (``"exporting snapshot sum-2026-01-03"``).
    """
    import errno

    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or NO_SPACE.lower() in str(error).lower()
    if not full:
        return None
    return OSError(errno.ENOSPC, f"no space left on device {what} ({_free(path)}); nothing half-written is kept: "
                                 f"free space there and rerun")
