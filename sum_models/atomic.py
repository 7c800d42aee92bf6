"""Crash-safe replaces of files and folders: a SIGKILL (or a power cut) at any point leaves the old or the new
content at the path, never none and never half of either.

On the lowest floor because the snapshot export needs it too (``sum_platform.files`` builds its writers on it).

A replace writes a temporary sibling with a dot name (readers of ``*.parquet`` / ``ds=*`` never see it), fsyncs its
files and folders, then swaps it in:

* a file: ``rename`` over the old one (atomic on POSIX), then an fsync of the parent folder;
* a folder over a folder: ``renameat2(RENAME_EXCHANGE)`` swaps the two names in one step (Linux 3.15+, most local
  filesystems), the parent is fsynced, and the old content, now under the temporary name, is deleted. Where the
  kernel or filesystem refuses the exchange, the old folder is renamed aside, the new one in, and the aside one
  deleted: a kill between the two renames leaves the path missing for that instant, and the next replace (or
  :func:`recover`) renames the aside folder back.

Leftovers of a killed replace are siblings named ``.<name>.<pid>-<hex>.tmp`` / ``.old``; the next replace of the
same path cleans those whose process is gone (never a live writer's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["fsync_dir", "fsync_tree", "exchange", "replace_path", "recover", "temp_sibling", "STEP_HOOK"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)

#: Called with the name of each step of a replace (tests stop a process at one with a real SIGKILL).
STEP_HOOK: Callable[[str], None] = lambda step: None
#: Whether to try ``renameat2(RENAME_EXCHANGE)`` (False forces the rename-aside fallback, for tests).
USE_EXCHANGE = True


def _step(name: str) -> None:
    STEP_HOOK(name)


def fsync_dir(path: Path) -> None:
    """Makes a folder's entries (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsyncs a file, or every file and folder under a folder (the folder last)."""
    path = Path(path)
    if not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for folder, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_tree(Path(folder) / name)
        fsync_dir(Path(folder))


def exchange(a: Path, b: Path) -> bool:
    """Swaps the names ``a`` and ``b`` atomically (``renameat2(RENAME_EXCHANGE)``); False when the kernel or the
    filesystem does not support it (nothing was changed then)."""
    if _renameat2 is None or not USE_EXCHANGE:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A reader-invisible sibling name of ``path`` owned by this process: ``.<name>.<pid>-<hex>.<kind>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}")


def _siblings(path: Path) -> list[tuple[Path, int, str]]:
    """The leftovers of replaces of ``path``: ``(sibling, pid, kind)``."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{8}}\.(tmp|old)$")
    out = []
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return out
    for entry in entries:
        if m := pattern.match(entry.name):
            out.append((entry, int(m.group(1)), m.group(2)))
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(path: Path) -> None:
    """Finishes what a killed replace of ``path`` left: a missing ``path`` gets its aside (``.old``) content back;
    every leftover of a process that is gone is deleted. A live writer's siblings are left alone."""
    path = Path(path)
    dead = [(p, kind) for p, pid, kind in _siblings(path) if not _alive(pid)]
    if not os.path.lexists(path):
        aside = sorted((p for p, kind in dead if kind == "old"), key=lambda p: p.stat().st_mtime)
        if aside:
            os.rename(aside[-1], path)  # the newest old content: the fallback's kill window
            fsync_dir(path.parent)
    for p, _ in dead:
        if os.path.lexists(p):
            _remove(p)


def replace_path(tmp: Path, path: Path) -> None:
    """Moves the finished ``tmp`` (a file or a folder, a sibling of ``path``) to ``path``, durably (see the module
    docstring). ``tmp`` no longer exists afterwards."""
    tmp, path = Path(tmp), Path(path)
    _step("written")
    fsync_tree(tmp)
    _step("synced")
    if os.path.lexists(path) and (tmp.is_dir() or path.is_dir()):
        if exchange(tmp, path):
            _step("exchanged")
            fsync_dir(path.parent)
            _step("exchange-synced")
            _remove(tmp)  # the old content, now under the temporary name
            _step("old-removed")
            return
        aside = temp_sibling(path, "old")
        os.rename(path, aside)
        _step("aside")
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(aside, path)
            raise
        _step("renamed-in")
        fsync_dir(path.parent)
        _step("rename-synced")
        _remove(aside)
        _step("old-removed")
        return
    os.replace(tmp, path)
    _step("renamed-in")
    fsync_dir(path.parent)
    _step("rename-synced")
