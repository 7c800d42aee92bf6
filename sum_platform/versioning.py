"""Versioning of the artifact workspace with real ``git``, ``dvc`` and ``gto``.

The workspace (see :mod:`sum_platform.workspace`) is its own git + DVC repository, a DVC "data
registry" kept apart from the source repo so daily runs never commit into the source repo:

* data partitions (``data/events/ds=…``, ``data/users/ds=…``, ``data/embeddings/ds=…``) and model
  snapshots (``snapshots/<snapshot_id>``) are ``dvc add``-ed, ``dvc push``-ed to the remote named
  ``storage`` (a local folder by default, any DVC URL works) and their ``.dvc`` files are committed;
* the working state (``registry/``, ``feast/``, ``gx/``, ``airflow/``, ``runs/``, ``quarantine/``)
  is git-ignored (and DVC-ignored); the audit trail among it (the registry, the day records, the
  quarantine) is copied into ``audit/`` and versioned at every promotion (:mod:`sum_platform.audit_trail`);
* the workspace's marker (``.sum-workspace.json``, its identity) is committed, so a restored workspace is
  the same workspace;
* the workspace's git history (``main`` and every tag) is pushed at every promotion to the git remote
  :data:`BACKUP_REMOTE`, by default a bare repository inside a local DVC remote
  (``<remote>/workspaces/<identity>.git``): the remote folder alone restores the workspace
  (``sumctl restore``, :mod:`sum_pipeline.restore`);
* a promotion is recorded with GTO (Git Tag Ops): the artifact ``user-tower`` is declared in the
  workspace's ``dvc.yaml`` (``artifacts:`` section, the place DVC 3 and GTO tooling read it from),
  with ``path: snapshots/<snapshot_id>``; each promotion commits ``dvc.yaml`` pointing at the promoted
  snapshot, registers a new semver version on that commit (``user-tower@v0.0.N``, annotated tag whose
  message starts with the snapshot id) and assigns stage ``prod`` (``user-tower#prod#N``). These are
  standard GTO tags: ``gto show``, ``gto history user-tower``, ``dvc artifacts get`` understand them.

This module is a thin layer over the command-line tools, run as subprocesses from the same venv
(``<venv>/bin/dvc``, ``<venv>/bin/gto``, ``git`` from ``PATH``). The CLIs are the stable interface
(DVC's and GTO's Python internals change between minor versions, and GTO mutates ``os.environ``
while tagging), every command is logged (logger ``sum_platform.versioning``), its duration too, and
any failure raises :class:`VersioningError` carrying the command, exit code and stderr. The commands
below are exactly what an operator would type.

Locks: DVC-touching calls are serialised by the platform, but a lock may still be found held (an
interactive ``dvc`` in another shell) or stale (a killed ``git``). DVC's own lock is an ``fcntl`` lock
(released by the OS when its holder dies) and its ``rwlock`` drops dead PIDs by itself, so a lock that
is *held* is retried with back-off (:data:`LOCK_RETRY_DELAYS`) rather than waited on forever
(``dvc --wait-for-lock`` has no timeout). A git ``*.lock`` file (``index.lock`` …) left by a killed
git is removed once older than :data:`STALE_GIT_LOCK_SECONDS`.

The shell commands each function runs, and the ways to restore a promoted snapshot by its tag, are in
the README ("Versioning and restoring").
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from sum_platform.config import load_params
from sum_platform.files import disk_full, replace_atomically
from sum_platform.workspace import MARKER, Workspace

log = logging.getLogger(__name__)

ARTIFACT_NAME = "user-tower"
"""GTO artifact name of promoted snapshots (declared in the workspace's ``dvc.yaml``)."""
ARTIFACT_TYPE = "model"
PROD_STAGE = "prod"
REMOTE_NAME = "storage"
DEFAULT_BRANCH = "main"
COMMITTER_NAME = "sum-platform"
COMMITTER_EMAIL = "sum@localhost"
SNAPSHOTS_DIR = "snapshots"
DVC_YAML = "dvc.yaml"

BACKUP_REMOTE = "sum-backup"
"""The workspace's git remote that every promotion pushes ``main`` and the tags to (see :func:`push_backup`)."""
BACKUPS_DIR = "workspaces"
"""Folder of a local DVC remote holding the workspaces' bare git repositories, one per identity."""

WORKING_STATE_DIRS: tuple[str, ...] = ("registry", "feast", "gx", "airflow", "runs", "quarantine")
"""Untracked working state of the workspace: git-ignored and DVC-ignored, never versioned."""

LOCK_RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0)
"""Back-off (seconds) between attempts when a DVC/git lock is held; DVC itself retries for ~3 s."""
STALE_GIT_LOCK_SECONDS = 120.0
"""A git ``*.lock`` file inside the workspace older than this is considered left by a dead git."""
COMMAND_TIMEOUT_SECONDS: float | None = 3600.0

_MANAGED_HEADER = "# sum-platform working state (untracked, see sum_platform/versioning.py)"
_SNAPSHOT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DVC_LOCK_MARKERS = ("Unable to acquire lock", "is busy, it is being blocked by")
_GIT_LOCK_RE = re.compile(r"Unable to create '([^']+\.lock)': File exists")
# Variables that would redirect a git subprocess to another repository (e.g. when running in a hook).
_GIT_LOCATION_VARS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
)


class VersioningError(RuntimeError):
    """A git/dvc/gto command failed, or a versioning precondition does not hold.

    Attributes:
        cmd: The command line that failed (``None`` for precondition errors).
        returncode: Its exit code.
        stderr: Its standard error (and, when useful, standard output).
    """

    def __init__(
        self,
        message: str,
        *,
        cmd: Sequence[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        self.cmd = list(cmd) if cmd else None
        self.returncode = returncode
        self.stderr = stderr
        detail = message
        if cmd:
            detail += f"\n  command: {shlex.join(cmd)}\n  exit code: {returncode}"
        if stderr.strip():
            detail += "\n  stderr:\n    " + stderr.strip().replace("\n", "\n    ")
        super().__init__(detail)


class TagNotFound(VersioningError, LookupError):
    """No GTO version of :data:`ARTIFACT_NAME` holds the requested snapshot (or the tag is unknown)."""


@dataclass(frozen=True)
class Promotion:
    """One registered version of :data:`ARTIFACT_NAME` (one promoted snapshot)."""

    snapshot_id: str
    version: str
    """Semver with GTO's ``v`` prefix, e.g. ``v0.0.3``."""
    tag: str
    """The GTO registration tag, e.g. ``user-tower@v0.0.3``."""
    commit: str
    created_at: int
    """Tag creation time (unix seconds)."""


# --------------------------------------------------------------------------------------- commands


def _tool(name: str) -> str:
    """Finds an executable: next to the running interpreter (the venv) first, then on ``PATH``."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise VersioningError(f"`{name}` executable not found (looked next to {sys.executable} and on PATH)")
    return found


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_TERMINAL_PROMPT="0",
        GTO_EMOJIS="false",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def _git_lock_to_clear(root: Path, output: str) -> Path | None:
    """Returns a stale git lock file named in ``output`` (inside ``root``), or ``None``."""
    m = _GIT_LOCK_RE.search(output)
    if not m:
        return None
    lock = Path(m.group(1))
    lock = lock if lock.is_absolute() else root / lock
    try:
        lock.resolve().relative_to(root.resolve())
        age = time.time() - lock.stat().st_mtime
    except (ValueError, OSError):
        return None
    if age <= STALE_GIT_LOCK_SECONDS or _git_running_in(root):
        return None  # young, or a (slow) git still works in this repository: its lock, not a dead one's
    return lock


def _git_running_in(root: Path) -> bool:
    """Whether a live ``git`` process works inside ``root`` (its cwd there): age alone does not make a lock stale."""
    import psutil

    root = root.resolve()
    for proc in psutil.process_iter(["name", "cwd"]):
        try:
            if proc.info["name"] == "git" and proc.info["cwd"] and Path(proc.info["cwd"]).is_relative_to(root):
                return True
        except (psutil.Error, OSError):
            continue
    return False


def _run(args: Sequence[str], cwd: Path, *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Runs one command (logged, timed), retrying while a DVC/git lock is held.

    Raises:
        VersioningError: The command failed (``check``), timed out or could not be started.
    """
    args = [str(a) for a in args]
    cmd = shlex.join(args)
    for attempt in range(len(LOCK_RETRY_DELAYS) + 1):
        log.info("$ %s   (cwd=%s)", cmd, cwd)
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                args,
                cwd=cwd,
                env=_env(),
                input=input,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired as exc:
            raise VersioningError(
                f"timed out after {COMMAND_TIMEOUT_SECONDS}s", cmd=args, stderr=str(exc.stderr or "")
            ) from exc
        except OSError as exc:
            raise VersioningError(f"could not run: {exc}", cmd=args) from exc
        log.debug("%s -> exit %d in %.2fs", cmd, proc.returncode, time.perf_counter() - start)
        if proc.returncode == 0 or not check:
            return proc
        output = proc.stderr + proc.stdout
        if attempt < len(LOCK_RETRY_DELAYS):
            delay = LOCK_RETRY_DELAYS[attempt]
            if any(marker in output for marker in _DVC_LOCK_MARKERS):
                log.warning("DVC repository lock is held; retrying in %.0fs: %s", delay, cmd)
                time.sleep(delay)
                continue
            if _GIT_LOCK_RE.search(output):
                stale = _git_lock_to_clear(cwd, output)
                if stale is not None:
                    log.warning("removing stale git lock %s (older than %.0fs)", stale, STALE_GIT_LOCK_SECONDS)
                    stale.unlink(missing_ok=True)
                else:
                    log.warning("git lock is held; retrying in %.0fs: %s", delay, cmd)
                    time.sleep(delay)
                continue
        raise VersioningError(f"`{args[0].rsplit('/', 1)[-1]}` failed", cmd=args, returncode=proc.returncode, stderr=output)
    raise AssertionError("unreachable")


def _git(root: Path, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return _run([_tool("git"), *args], root, check=check, input=input)


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([_tool("dvc"), *args], root, check=check)


def _gto(root: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([_tool("gto"), *args], root)


def _timed(label: str):
    """Logs the wall time of a public operation (the slow ones shell out several times)."""

    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()
            return self

        def __exit__(self, *exc):
            log.info("%s took %.2fs", label, time.perf_counter() - self.start)

    return _Timer()


# ---------------------------------------------------------------------------------------- helpers


def _rel(root: Path, path: Path | str) -> str:
    """``path`` relative to ``root`` in posix form; rejects paths outside the workspace."""
    root = Path(root).resolve()
    p = Path(path)
    p = (p if p.is_absolute() else root / p).resolve()
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise VersioningError(f"{path} is not inside the workspace {root}") from None
    if not rel.parts:
        raise VersioningError("cannot track the workspace root itself")
    return rel.as_posix()


def _check_snapshot_id(snapshot_id: str) -> None:
    if not _SNAPSHOT_ID_RE.match(snapshot_id):
        raise VersioningError(f"invalid snapshot id {snapshot_id!r}")


def _commit(root: Path, files: Iterable[str], message: str) -> str | None:
    """Stages ``files`` and commits exactly those if they changed; returns the new sha or ``None``."""
    files = sorted({f for f in files if (root / f).exists()})
    if not files:
        return None
    _git(root, "add", "--", *files)
    if _git(root, "diff", "--cached", "--quiet", "--", *files, check=False).returncode == 0:
        return None
    _git(root, "commit", "-q", "-m", message, "--", *files)
    return _head(root)


def _head(root: Path) -> str:
    return _git(root, "rev-parse", "HEAD").stdout.strip()


def _ensure_lines(path: Path, lines: Sequence[str]) -> None:
    """Appends the missing ``lines`` (under a managed header) to a text file, keeping the rest."""
    existing = path.read_text().splitlines() if path.exists() else []
    missing = [line for line in lines if line not in existing]
    if not missing:
        return
    block = ([] if _MANAGED_HEADER in existing else [_MANAGED_HEADER]) + missing
    text = "\n".join(existing).rstrip("\n")
    path.write_text((text + "\n\n" if text else "") + "\n".join(block) + "\n")


def _read_dvc_config(root: Path) -> dict:
    """The repo-level ``.dvc/config`` as nested dicts (``{}`` when absent)."""
    from configobj import ConfigObj  # DVC's own config parser

    path = root / ".dvc" / "config"
    return ConfigObj(str(path)).dict() if path.exists() else {}


def _remote_path(root: Path) -> Path:
    """The default DVC remote's folder (a local remote), else the workspace."""
    config = _read_dvc_config(root)
    url = config.get(f'remote "{REMOTE_NAME}"', {}).get("url", "")
    return Path(url) if url and "://" not in url else root


def _semver_key(version: str) -> tuple[int, int, int, str]:
    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)(.*)$", version)
    return (int(m[1]), int(m[2]), int(m[3]), m[4]) if m else (-1, -1, -1, version)


def _artifact_tags(root: Path) -> list[dict]:
    """All GTO tags of :data:`ARTIFACT_NAME`: parsed name + tag, commit and creation time."""
    from gto.tag import parse_name  # pure tag-name parsing, no repository access

    fmt = "%(refname:strip=2)%09%(objectname)%09%(*objectname)%09%(creatordate:unix)"
    out = _git(root, "for-each-ref", f"--format={fmt}", "refs/tags").stdout
    tags = []
    for line in out.splitlines():
        name, obj, peeled, created = (line.split("\t") + ["", "", "", ""])[:4]
        parsed = parse_name(name, raise_on_fail=False)
        if parsed and parsed.get("name") == ARTIFACT_NAME:
            tags.append({**parsed, "tag": name, "commit": peeled or obj, "created_at": int(created or 0)})
    return tags


def _read_at(root: Path, specs: Sequence[str]) -> list[str | None]:
    """Reads ``<rev>:<path>`` blobs in one ``git cat-file --batch`` call (``None`` when missing)."""
    if not specs:
        return []
    log.info("$ git cat-file --batch <<< %s   (cwd=%s)", " ".join(specs), root)
    proc = subprocess.run(
        [_tool("git"), "cat-file", "--batch"],
        cwd=root,
        env=_env(),
        input=("\n".join(specs) + "\n").encode(),
        capture_output=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    if proc.returncode != 0:
        raise VersioningError("`git cat-file` failed", cmd=["git", "cat-file", "--batch"],
                              returncode=proc.returncode, stderr=proc.stderr.decode(errors="replace"))
    data, pos = proc.stdout, 0
    result: list[str | None] = []
    for _ in specs:
        eol = data.index(b"\n", pos)
        header = data[pos:eol].decode().split()
        pos = eol + 1
        if len(header) == 3 and header[1] == "blob":
            size = int(header[2])
            result.append(data[pos:pos + size].decode())
            pos += size + 1
        else:  # "<spec> missing" / "ambiguous"
            result.append(None)
    return result


def _snapshot_from_dvc_yaml(text: str | None) -> str | None:
    """The snapshot id the ``user-tower`` artifact points at in a ``dvc.yaml`` text."""
    if not text:
        return None
    art = ((yaml.safe_load(text) or {}).get("artifacts") or {}).get(ARTIFACT_NAME) or {}
    meta = art.get("meta") or {}
    if meta.get("snapshot_id"):
        return str(meta["snapshot_id"])
    path = art.get("path")
    return Path(path).name if path else None


def _write_artifact_declaration(root: Path, snapshot_id: str, data_version_md5: str | None) -> None:
    """Points ``artifacts.user-tower`` of the workspace's ``dvc.yaml`` at ``snapshots/<snapshot_id>``.

    Round-trips the file so anything else in it (stages, other artifacts, comments) is kept.
    """
    from ruamel.yaml import YAML

    rt = YAML()
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096
    path = root / DVC_YAML
    doc = rt.load(path.read_text()) if path.exists() else None
    if doc is None:
        doc = {}
    artifacts = doc.setdefault("artifacts", {})
    meta = {"snapshot_id": snapshot_id}
    if data_version_md5:
        meta["data_version"] = data_version_md5
    artifacts[ARTIFACT_NAME] = {
        "path": f"{SNAPSHOTS_DIR}/{snapshot_id}",
        "type": ARTIFACT_TYPE,
        "desc": "SUM user tower promoted to prod (written by sum_platform.versioning)",
        "labels": ["sum", "user-tower"],
        "meta": meta,
    }
    with open(path, "w") as fh:
        rt.dump(doc, fh)


def _wait_past_last_assignment(root: Path) -> None:
    """Makes the next GTO tag strictly newer than the artifact's last stage assignment.

    Tag dates have one-second resolution and GTO orders stage assignments by date: two ``prod``
    assignments within the same second would make the older version look current.
    """
    last = max((t["created_at"] for t in _artifact_tags(root) if "stage" in t), default=0)
    wait = last + 1 - time.time()
    if wait > 0:
        time.sleep(wait + 0.05)


# ----------------------------------------------------------------------------------------- public


def init_workspace_repo(root: Path, remote_url: str | None = None) -> None:
    """Makes ``root`` a git + DVC repository with the default remote ``storage`` (idempotent).

    Runs ``git init -b main`` (unless ``root/.git`` exists), sets a local committer identity if the
    repo has none, ``dvc init`` (unless ``root/.dvc`` exists), ``dvc config core.analytics false``,
    ``dvc remote add -d -f storage <remote_url>`` (a local path is made absolute and created),
    git-ignores (and DVC-ignores) the working-state folders, claims the workspace's marker
    (:meth:`Workspace.claim`) and commits whatever of that changed. With a local remote, the git remote
    :data:`BACKUP_REMOTE` is pointed at ``<remote>/workspaces/<identity>.git`` (see :func:`push_backup`).

    Args:
        root: The workspace directory (created if missing).
        remote_url: Any DVC remote URL or a local folder; defaults to ``load_params().dvc_remote``.
    """
    with _timed("init_workspace_repo"):
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if remote_url is None:
            remote_url = load_params().dvc_remote
        if "://" not in remote_url:
            local = Path(remote_url).expanduser()
            local = local if local.is_absolute() else (Path.cwd() / local)
            local.mkdir(parents=True, exist_ok=True)
            remote_url = str(local.resolve())

        if not (root / ".git").exists():
            _git(root, "init", "-q", "-b", DEFAULT_BRANCH)
        for key, value in (("user.name", COMMITTER_NAME), ("user.email", COMMITTER_EMAIL)):
            if _git(root, "config", "--local", "--get", key, check=False).returncode != 0:
                _git(root, "config", "--local", key, value)
        _git(root, "config", "--local", "commit.gpgsign", "false")
        _git(root, "config", "--local", "tag.gpgsign", "false")

        if not (root / ".dvc").is_dir():
            _dvc(root, "init", "-q")
        # Read the repo config directly (DVC's own INI format) so a rerun spawns no `dvc` at all;
        # changes are made with `dvc config` / `dvc remote add`.
        config = _read_dvc_config(root)
        core = config.get("core", {})
        if str(core.get("analytics", "")).lower() != "false":
            _dvc(root, "config", "core.analytics", "false")
        if config.get(f'remote "{REMOTE_NAME}"', {}).get("url") != remote_url or core.get("remote") != REMOTE_NAME:
            _dvc(root, "remote", "add", "-d", "-f", REMOTE_NAME, remote_url)

        ignored = [f"/{d}/" for d in WORKING_STATE_DIRS]
        _ensure_lines(root / ".gitignore", ignored)
        _ensure_lines(root / ".dvcignore", ignored)
        # Committed: a workspace restored from its history keeps its identity (the stack, SOAP and doctor name it).
        identity = Workspace(root).claim()
        sha = _commit(
            root,
            [".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore", MARKER],
            "sum-platform: initialise workspace repository (git + DVC, remote 'storage')",
        )
        _ensure_backup_remote(root, remote_url, identity)
        log.info("workspace repo ready at %s (remote %s)%s", root, remote_url, f", committed {sha}" if sha else "")


def track_paths(root: Path, paths: list[Path], message: str) -> str | None:
    """Versions data directories/files: ``dvc add``, ``dvc push``, commit the ``.dvc`` files.

    Rerun-safe: re-adding unchanged paths is a no-op (no commit, returns ``None``); a changed path gets
    an updated ``.dvc`` file (new md5, see :func:`data_version`) and a new commit. The push always
    runs, so objects a previous run failed to upload are sent now.

    Args:
        root: The workspace (initialised with :func:`init_workspace_repo`).
        paths: Directories or files inside ``root`` (absolute or relative to it), e.g.
            ``data/events/ds=2026-01-03`` or ``snapshots/sum-2026-01-03``.
        message: The commit message.

    Returns:
        The new commit sha, or ``None`` when nothing changed.
    """
    root = Path(root).resolve()
    rels = sorted({_rel(root, p) for p in paths})
    if not rels:
        return None
    for rel in rels:
        top = rel.split("/", 1)[0]
        if top in WORKING_STATE_DIRS or top in (".git", ".dvc"):
            raise VersioningError(f"{rel} is in untracked working state ({top}/) and cannot be versioned")
        if not (root / rel).exists():
            raise VersioningError(f"cannot track {rel}: it does not exist in {root}")
    dvcfiles = [f"{rel}.dvc" for rel in rels]
    with _timed(f"track_paths({', '.join(rels)})"):
        try:
            _dvc(root, "add", *rels)
            _dvc(root, "push", *dvcfiles)
        except VersioningError as exc:
            # A full disk (the DVC cache's or the remote's): said first, with the free space; nothing is committed,
            # and the remote keeps no partial object (DVC uploads to a temporary name, then renames).
            step = (exc.cmd or ["", "dvc"])[1]
            where = _remote_path(root) if step == "push" else root / ".dvc" / "cache"
            full = disk_full(exc.stderr, where, f"versioning {', '.join(rels)} (`dvc {step}`)")
            if full is None:
                raise
            raise VersioningError(full.strerror, cmd=exc.cmd, returncode=exc.returncode, stderr=exc.stderr) from exc
        gitignores = {(Path(rel).parent / ".gitignore").as_posix() for rel in rels}
        sha = _commit(root, [*dvcfiles, *gitignores], message)
    log.info("tracked %s: %s", ", ".join(rels), sha or "unchanged")
    return sha


def data_version(root: Path, path: Path | str, rev: str | None = None) -> str:
    """The DVC md5 of a tracked path (``<md5>.dir`` for a directory), as in its ``.dvc`` file.

    Args:
        root: The workspace.
        path: The tracked path (or its ``.dvc`` file), absolute or relative to ``root``.
        rev: Read the ``.dvc`` file at this git revision instead of the working tree.
    """
    root = Path(root).resolve()
    rel = _rel(root, path)
    dvcfile = rel if rel.endswith(".dvc") else f"{rel}.dvc"
    text: str | None
    if rev is None:
        try:
            text = (root / dvcfile).read_text()
        except FileNotFoundError:
            raise VersioningError(f"{rel} is not DVC-tracked ({dvcfile} missing)") from None
    else:
        text = _read_at(root, [f"{rev}:{dvcfile}"])[0]
        if text is None:
            raise VersioningError(f"{dvcfile} does not exist at {rev}")
    outs = (yaml.safe_load(text) or {}).get("outs") or []
    if not outs or not outs[0].get("md5"):
        raise VersioningError(f"{dvcfile} has no md5 (not a `dvc add` file?)")
    return str(outs[0]["md5"])


def data_versions(root: Path, paths: Iterable[Path | str]) -> dict[str, str]:
    """:func:`data_version` of several paths, keyed by their workspace-relative path."""
    return {_rel(Path(root), p): data_version(root, p) for p in paths}


def list_promotions(root: Path) -> list[Promotion]:
    """All active (not deregistered) GTO versions of :data:`ARTIFACT_NAME`, oldest semver first.

    The snapshot of each version is read from ``dvc.yaml`` at the tagged commit (one git call).
    """
    root = Path(root).resolve()
    tags = _artifact_tags(root)
    deregistered = {t["version"] for t in tags if t.get("action") is not None and t["action"].value == "deregister"}
    registrations = [
        t for t in tags if t.get("action") is not None and t["action"].value == "register"
        and t["version"] not in deregistered
    ]
    texts = _read_at(root, [f"{t['commit']}:{DVC_YAML}" for t in registrations])
    promotions = []
    for t, text in zip(registrations, texts):
        snapshot_id = _snapshot_from_dvc_yaml(text)
        if snapshot_id:
            promotions.append(Promotion(snapshot_id, t["version"], t["tag"], t["commit"], t["created_at"]))
    return sorted(promotions, key=lambda p: _semver_key(p.version))


def tag_for_snapshot(root: Path, snapshot_id: str) -> str:
    """The GTO version tag (``user-tower@vX.Y.Z``) recording the promotion of ``snapshot_id``.

    Raises:
        TagNotFound: The snapshot was never promoted.
    """
    matches = [p for p in list_promotions(root) if p.snapshot_id == snapshot_id]
    if not matches:
        raise TagNotFound(f"snapshot {snapshot_id!r} has no {ARTIFACT_NAME} version tag in {root}")
    return matches[0].tag


def snapshot_for_tag(root: Path, tag: str) -> str:
    """The snapshot id recorded by a tag.

    Args:
        root: The workspace.
        tag: A GTO tag (``user-tower@v0.0.2``, ``user-tower#prod#3``), a GTO shortcut
            (``user-tower#prod``, ``user-tower@latest``) or any git revision.

    Raises:
        TagNotFound: The tag is unknown or does not point at a promotion commit.
    """
    root = Path(root).resolve()
    from gto.constants import parse_shortcut  # pure parsing of `name#stage` / `name@latest`

    rev = tag
    if _git(root, "rev-parse", "--verify", "-q", f"{tag}^{{commit}}", check=False).returncode != 0:
        out = _gto(root, "show", tag, "--ref").stdout.split() if parse_shortcut(tag).shortcut else []
        if len(out) != 1:
            raise TagNotFound(f"{tag!r} is neither a git revision nor a GTO shortcut with one version in {root}")
        rev = out[0]
    snapshot_id = _snapshot_from_dvc_yaml(_read_at(root, [f"{rev}^{{commit}}:{DVC_YAML}"])[0])
    if not snapshot_id:
        raise TagNotFound(f"{tag!r} does not point at a commit declaring {ARTIFACT_NAME} in {DVC_YAML}")
    return snapshot_id


def production_version(root: Path) -> str | None:
    """The version of :data:`ARTIFACT_NAME` currently in stage ``prod`` per GTO (``gto show``), if any."""
    out = _gto(Path(root).resolve(), "show", f"{ARTIFACT_NAME}#{PROD_STAGE}", "--version").stdout.strip()
    return out.splitlines()[-1].strip() if out else None


def production_snapshot(root: Path) -> str | None:
    """The snapshot id currently in stage ``prod`` per GTO, if any."""
    version = production_version(root)
    return snapshot_for_tag(root, f"{ARTIFACT_NAME}@{version}") if version else None


def tag_promotion(root: Path, snapshot_id: str, message: str, *, tracked: bool = False) -> str:
    """Records the promotion of ``snapshot_id`` with GTO and returns its version tag.

    Steps: make sure ``snapshots/<snapshot_id>`` is tracked and pushed (:func:`track_paths`), point
    ``artifacts.user-tower`` in ``dvc.yaml`` at it and commit, ``gto register`` a new version on that
    commit (patch bump: ``v0.0.1``, ``v0.0.2``, …; tag message ``"<snapshot_id>: <message>"``) and
    ``gto assign`` it stage ``prod``.

    Idempotent: a snapshot that already has a version returns that version's tag. If that version is
    not the one in ``prod`` any more (a rollback to an earlier snapshot), ``prod`` is assigned to it
    again (a new ``user-tower#prod#N`` tag), so GTO's ``prod`` always matches the last promotion.
    The snapshot's later local changes are not re-versioned under an existing tag. ``tracked``: the caller has
    just run :func:`track_paths` on the snapshot (skips a second ``dvc add``/``dvc push``).

    Returns:
        The registration tag, e.g. ``user-tower@v0.0.2``.
    """
    _check_snapshot_id(snapshot_id)
    root = Path(root).resolve()
    label = f"{snapshot_id}: {message}".strip()
    with _timed(f"tag_promotion({snapshot_id})"):
        existing = [p for p in list_promotions(root) if p.snapshot_id == snapshot_id]
        if existing:
            promo = existing[0]
            if production_version(root) != promo.version:
                _wait_past_last_assignment(root)
                _gto(root, "assign", ARTIFACT_NAME, "--version", promo.version, "--stage", PROD_STAGE,
                     "--force", "-m", label)
                log.info("re-assigned %s to %s (%s)", PROD_STAGE, promo.tag, snapshot_id)
            return promo.tag

        rel = f"{SNAPSHOTS_DIR}/{snapshot_id}"
        if (root / rel).exists() and not tracked:
            track_paths(root, [root / rel], f"track snapshot {snapshot_id}")
        elif _git(root, "ls-files", "--error-unmatch", f"{rel}.dvc", check=False).returncode != 0:
            raise VersioningError(f"cannot promote {snapshot_id}: neither {rel} nor a committed {rel}.dvc exists")
        md5 = data_version(root, rel)

        _write_artifact_declaration(root, snapshot_id, md5)
        _commit(root, [DVC_YAML], f"promote {ARTIFACT_NAME}: {snapshot_id}\n\n{message}".strip())
        head = _head(root)
        if any(t["commit"] == head and "version" in t for t in _artifact_tags(root)):
            # dvc.yaml already pointed here and HEAD carries another version: GTO allows one per commit.
            _git(root, "commit", "-q", "--allow-empty", "-m", f"promote {ARTIFACT_NAME}: {snapshot_id}")
            head = _head(root)

        _gto(root, "register", ARTIFACT_NAME, head, "-m", label)
        versions = [t for t in _artifact_tags(root) if t["commit"] == head and t.get("action") is not None
                    and t["action"].value == "register"]
        if not versions:
            raise VersioningError(f"`gto register` created no {ARTIFACT_NAME} version tag on {head}")
        tag, version = versions[0]["tag"], versions[0]["version"]
        _wait_past_last_assignment(root)
        _gto(root, "assign", ARTIFACT_NAME, "--version", version, "--stage", PROD_STAGE, "-m", label)
    log.info("promoted %s as %s (stage %s, commit %s)", snapshot_id, tag, PROD_STAGE, head[:12])
    return tag


def backup_url(remote_url: str, identity: str) -> str | None:
    """Where a workspace's git history is backed up inside a local DVC remote (None for a URL remote).

    DVC keeps its objects under ``files/md5`` of the remote and never lists other folders, so a bare git
    repository beside them is safe from ``dvc gc --cloud``.
    """
    if "://" in remote_url:
        return None
    return str(Path(remote_url) / BACKUPS_DIR / f"{identity}.git")


def _ensure_backup_remote(root: Path, remote_url: str, identity: str) -> None:
    """Points :data:`BACKUP_REMOTE` at the local DVC remote's bare repository of this identity (and follows a DVC
    remote that moved); a URL remote, or a backup the operator pointed elsewhere, is left to the operator
    (``git remote add|set-url sum-backup <url>``)."""
    url = backup_url(remote_url, identity)
    if url is None:
        return
    current = _git(root, "remote", "get-url", BACKUP_REMOTE, check=False)
    if current.returncode != 0:
        _git(root, "remote", "add", BACKUP_REMOTE, url)
    elif current.stdout.strip() != url and current.stdout.strip().endswith(f"/{BACKUPS_DIR}/{identity}.git"):
        _git(root, "remote", "set-url", BACKUP_REMOTE, url)


def push_backup(root: Path) -> str | None:
    """Pushes the workspace's ``main`` and every tag to the git remote :data:`BACKUP_REMOTE`.

    A local bare repository is created on first use. The push is fast-forward only: a backup holding commits
    this workspace does not have belongs to another workspace with the same identity (a copy), and is refused
    rather than overwritten.

    Returns:
        The backup's URL, or None when the workspace has no :data:`BACKUP_REMOTE` (a URL DVC remote and no git
        remote added by the operator; logged as a warning: the history then lives only on this disk).

    Raises:
        VersioningError: The push failed (a full disk says so first, with the free space).
    """
    root = Path(root).resolve()
    got = _git(root, "remote", "get-url", BACKUP_REMOTE, check=False)
    if got.returncode != 0:
        log.warning("workspace %s has no git remote %r: its history (tags, the audit trail's .dvc file) is not backed "
                    "up; add one with `git -C %s remote add %s <url>`", root, BACKUP_REMOTE, root, BACKUP_REMOTE)
        return None
    url = got.stdout.strip()
    with _timed(f"push_backup({url})"):
        try:
            if "://" not in url and ":" not in url.split("/", 1)[0] and not Path(url).exists():
                Path(url).parent.mkdir(parents=True, exist_ok=True)
                _git(root, "init", "-q", "--bare", "-b", DEFAULT_BRANCH, url)
            _git(root, "push", "-q", "--no-verify", BACKUP_REMOTE, f"refs/heads/{DEFAULT_BRANCH}:refs/heads/{DEFAULT_BRANCH}",
                 "refs/tags/*:refs/tags/*")
        except VersioningError as exc:
            full = disk_full(exc.stderr, Path(url) if "://" not in url else root, f"backing up the workspace's git to {url}")
            if full is not None:
                raise VersioningError(full.strerror, cmd=exc.cmd, returncode=exc.returncode, stderr=exc.stderr) from exc
            if "non-fast-forward" in exc.stderr or "[rejected]" in exc.stderr:
                raise VersioningError(
                    f"the backup {url} has commits this workspace does not: it is another workspace's history with the "
                    f"same identity (a copy of this one?). Nothing was overwritten; give one of them a new identity "
                    f"(delete its {MARKER} and rerun) or point {BACKUP_REMOTE} elsewhere",
                    cmd=exc.cmd, returncode=exc.returncode, stderr=exc.stderr) from exc
            raise
    return url


def list_backups(remote_url: str) -> dict[str, Path]:
    """The workspaces backed up in a local DVC remote: ``{identity: bare repository}``."""
    if "://" in remote_url:
        return {}
    folder = Path(remote_url) / BACKUPS_DIR
    return {p.name.removesuffix(".git"): p for p in sorted(folder.glob("*.git")) if (p / "HEAD").exists()}


def backup_marker(repo: Path) -> dict:
    """The identity marker committed on ``main`` of a backed-up repository (``{}`` if unreadable)."""
    try:
        return json.loads(_read_at(Path(repo), [f"{DEFAULT_BRANCH}:{MARKER}"])[0] or "{}")
    except (VersioningError, ValueError, OSError):
        return {}


def clone_workspace(source: str, root: Path) -> None:
    """Clones a workspace's git history (a :func:`push_backup` target or any clone of it) into ``root``.

    Refuses an existing, non-empty ``root``: a restore writes only into a folder it creates. The clone's
    ``origin`` becomes :data:`BACKUP_REMOTE`, so the restored workspace goes on pushing there.
    """
    root = Path(root).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise VersioningError(f"cannot restore into {root}: it exists and is not empty (move it aside first)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with _timed(f"clone_workspace({source})"):
        _run([_tool("git"), "clone", "-q", "--origin", BACKUP_REMOTE, "--branch", DEFAULT_BRANCH, source, str(root)],
             root.parent)


def pull_all(root: Path) -> None:
    """``dvc pull``: every DVC-tracked path of the checked-out commit (partitions, snapshots, the audit trail)
    from the remote into the cache and the workspace.

    Raises:
        VersioningError: An object is in neither the cache nor the remote, or the remote cannot be read.
    """
    with _timed("dvc pull"):
        _dvc(Path(root).resolve(), "pull")


def restore_snapshot(root: Path, snapshot_id: str, dest: Path, *, force: bool = False) -> Path:
    """Restores a promoted snapshot's files from its tag into ``dest``, using only git + DVC.

    Runs ``dvc get <root> snapshots/<snapshot_id> --rev <tag> -o <dest>``: DVC reads the ``.dvc`` file
    at the tag and fetches the objects from the local cache or, if gone, from the remote configured at
    that revision. Works after ``snapshots/<snapshot_id>`` (and the local cache) were deleted.

    Args:
        root: The workspace.
        snapshot_id: A promoted snapshot (see :func:`tag_for_snapshot`).
        dest: The directory to create with the snapshot's files (e.g. ``Workspace.snapshot_dir(id)``).
        force: Replace ``dest`` if it exists and is not empty (the files are fetched beside it and swapped in:
            a kill leaves the old files or the new, never none).

    Returns:
        ``dest`` (absolute).
    """
    _check_snapshot_id(snapshot_id)
    root = Path(root).resolve()
    dest = Path(dest).resolve()
    tag = tag_for_snapshot(root, snapshot_id)
    if dest.exists():
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        elif not force:
            raise VersioningError(f"cannot restore {snapshot_id} into {dest}: it exists (use force=True)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _timed(f"restore_snapshot({snapshot_id})"), replace_atomically(dest) as tmp:
        _run([_tool("dvc"), "get", str(root), f"{SNAPSHOTS_DIR}/{snapshot_id}", "--rev", tag, "-o", str(tmp)],
             dest.parent)
    log.info("restored %s (%s) into %s", snapshot_id, tag, dest)
    return dest


__all__ = [
    "ARTIFACT_NAME",
    "BACKUP_REMOTE",
    "PROD_STAGE",
    "REMOTE_NAME",
    "WORKING_STATE_DIRS",
    "Promotion",
    "TagNotFound",
    "VersioningError",
    "backup_marker",
    "backup_url",
    "clone_workspace",
    "data_version",
    "data_versions",
    "init_workspace_repo",
    "list_backups",
    "list_promotions",
    "production_snapshot",
    "production_version",
    "pull_all",
    "push_backup",
    "restore_snapshot",
    "snapshot_for_tag",
    "tag_for_snapshot",
    "tag_promotion",
    "track_paths",
]
