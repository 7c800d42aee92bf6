"""Layout of the artifact workspace (a git + DVC repository of its own, see params ``paths``)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

from configobj import ConfigObj  # DVC's own config parser

from sum_platform.files import read_json, write_json

#: The file that makes a folder a SUM workspace: its identity (a uuid), when and for what it was made. Commands
#: that delete or compare (``--fresh``, ``sumctl down``, ``doctor``) check it, so they act only on a workspace
#: they can name, and the stack's processes and the SOAP app carry the identity (``SUM_WORKSPACE_ID``).
MARKER = ".sum-workspace.json"
#: The file a local DVC remote carries: the workspace it was created for and every workspace that uses it.
#: ``--fresh`` deletes a remote only when it was created for the workspace being deleted and no other uses it.
REMOTE_MARKER = ".sum-remote.json"


def ds_str(ds: str | date) -> str:
    """Normalises a logical date to ``YYYY-MM-DD``."""
    return ds if isinstance(ds, str) else ds.isoformat()


def snapshot_id_for(ds: str | date) -> str:
    """The candidate snapshot trained on ``ds`` (one per date, so reruns replace it)."""
    return f"sum-{ds_str(ds)}"


@dataclass(frozen=True)
class Workspace:
    """Paths inside the workspace. Creating the object touches nothing on disk."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def events_dir(self, ds: str | date) -> Path:
        return self.data / "events" / f"ds={ds_str(ds)}"

    def users_dir(self, ds: str | date) -> Path:
        return self.data / "users" / f"ds={ds_str(ds)}"

    def embeddings_dir(self, ds: str | date) -> Path:
        return self.data / "embeddings" / f"ds={ds_str(ds)}"

    def quarantine_dir(self, ds: str | date) -> Path:
        return self.root / "quarantine" / f"ds={ds_str(ds)}"

    @property
    def probe_users(self) -> Path:
        return self.data / "probe_users.parquet"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id

    def downstream_dir(self, model: str, arm: str, ds: str | date) -> Path:
        """A downstream model's weights and metrics for one promoted day (``arm``: with | without SUM)."""
        return self.root / "downstream" / model / arm / f"ds={ds_str(ds)}"

    def downstream_frame(self, ds: str | date) -> Path:
        """The day's downstream training frame: impressions with the embeddings served at their time."""
        return self.root / "downstream" / "frames" / f"ds={ds_str(ds)}" / "frame.parquet"

    def run_dir(self, ds: str | date) -> Path:
        """Per-date working files of the DAG (metrics, gate verdicts); rerun-safe."""
        return self.root / "runs" / ds_str(ds)

    @property
    def registry_db(self) -> Path:
        return self.root / "registry" / "registry.db"

    @property
    def feast_dir(self) -> Path:
        return self.root / "feast"

    @property
    def gx_dir(self) -> Path:
        return self.root / "gx"

    @property
    def stack_dir(self) -> Path:
        """The deployed stack's state (``sumctl up``): pids, ports, logs, the Ray token, generated secrets."""
        return self.root / "stack"

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def identity(self) -> str | None:
        """The workspace's id from its marker (None: not a SUM workspace, or one made before markers)."""
        try:
            return str(json.loads(self.marker.read_text())["id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def claim(self, purpose: str = "workspace") -> str:
        """The workspace's id, writing the marker first if there is none (idempotent; creates ``root``).

        ``purpose`` is recorded with a new marker: ``demo`` marks a workspace that ``make run`` may recreate.
        """
        found = self.identity()
        if found is not None:
            return found
        self.root.mkdir(parents=True, exist_ok=True)
        ident = uuid.uuid4().hex
        write_json(self.marker, {"id": ident, "purpose": purpose, "root": str(self.root.resolve()),
                                 "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return ident

    @property
    def own_remote(self) -> Path:
        """The DVC remote a workspace given on the command line gets unless one is named: beside it, never the
        configured one (which belongs to the configured workspace)."""
        return self.root.parent / f"{self.root.name}-dvc-remote"

    def dvc_remote(self) -> str | None:
        """The remote the workspace's own DVC config names (``storage``), or None before ``init_workspace_repo``."""
        path = self.root / ".dvc" / "config"
        if not path.is_file():
            return None
        url = ConfigObj(str(path)).get('remote "storage"', {}).get("url")
        return str(url) if url else None

    def purpose(self) -> str | None:
        """What the marker says the workspace was made for (``workspace``, ``demo``, ``soak``...), or None."""
        try:
            return str(json.loads(self.marker.read_text()).get("purpose"))
        except (OSError, ValueError, AttributeError):
            return None


def is_local(remote: str) -> bool:
    """A remote on this machine's file system (not ``s3://``, ``ssh://``...)."""
    return "://" not in remote


def remote_claims(remote: str) -> dict:
    """The record of a local remote (:data:`REMOTE_MARKER`): ``created_for`` (an id, or None: it existed
    before any SUM workspace used it) and ``workspaces`` (id -> root of every workspace that uses it)."""
    path = Path(remote) / REMOTE_MARKER
    if not is_local(remote) or not path.is_file():
        return {}
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def claim_remote(remote: str, ws: Workspace) -> None:
    """Records that ``ws`` uses the local DVC remote ``remote`` (a URL with ``://``: nothing to record).

    A missing or empty folder is created for ``ws`` (``created_for``: the only workspace whose ``--fresh`` may
    delete it); a folder that already holds something without a record stays someone else's.
    """
    if not is_local(remote):
        return
    folder = Path(remote)
    ident = ws.claim()
    claims = remote_claims(remote)
    if not claims:
        new = not folder.exists() or not any(folder.iterdir())
        claims = {"created_for": ident if new else None, "workspaces": {}}
    if claims.get("workspaces", {}).get(ident) == str(ws.root.resolve()):
        return
    claims.setdefault("workspaces", {})[ident] = str(ws.root.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / REMOTE_MARKER, claims)
