"""The deployed stack: a long-lived Ray head serving SOAP and Airflow 3 as separate components.

``sumctl up`` starts, ``sumctl status`` reports and ``sumctl down`` stops, on this machine:

* ``ray``: ``ray start --head --block`` (CPUs and object store from params ``ray``, the dashboard on
  ``ray.dashboard_host``, token authentication with a token file of mode 0600), then the SOAP application
  with the registry's production snapshot;
* ``api-server``, ``scheduler`` (LocalExecutor, ``airflow.parallelism`` task processes), ``dag-processor``
  and ``triggerer``: Airflow on the metadata DB of the ``airflow.metadata_db`` profile, login required
  (the simple auth manager; the generated password is in the passwords file ``status`` names).

Every component runs in a session of its own (it outlives ``sumctl``), from the venv's ``bin`` without the
venv being activated; its pid, port and log file are in ``<workspace>/stack/stack.json``. ``up`` twice gives
one stack (it starts only what is not running); ``down`` stops the process group of every component and
checks that none of their processes is left. After a crash ``up`` is the whole recovery: it clears what a dead
component left behind (see :meth:`Stack._clear_after_crashes`), restarts it, and redeploys serving on a new head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
from cryptography.fernet import Fernet

from serving.ray_cluster import cluster_record, forget_cluster, is_loopback, record_cluster, token_env
from sum_pipeline import airflow_env, redis_server
from sum_pipeline.postgres import database_url
from sum_platform.config import PROJECT_ROOT, Params
from sum_platform.files import owner_only_secret, read_json, write_json
from sum_platform.workspace import Workspace

log = logging.getLogger(__name__)

#: The Airflow user the stack creates (simple auth manager, admin role).
AIRFLOW_USER = "admin"
#: Airflow's components, in start order (after Ray; the whole list, profile by profile: :attr:`Stack.components`).
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
#: The custom resource every worker node offers (one unit): what places work off the head.
WORKER_NODE_RESOURCE = "sum_worker_node"
#: The environment variable that carries the workspace's identity into every process of its stack.
IDENTITY_ENV = "SUM_WORKSPACE_ID"
UNIX_PATH_MAX = 107  # AF_UNIX path bytes Ray accepts
RAY_SOCKET_SUFFIX = 80  # what Ray appends under its temp dir, with room for longer pids
_BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    """A component did not come up; the message names it and its log."""


def ray_temp_parents() -> list[Path]:
    """Folders of this user only, in order of preference, for a Ray temp dir that ``stack/`` is too deep for:
    ``$XDG_RUNTIME_DIR/sum-ray``, ``~/.cache/sum-ray``, ``/tmp/sum-ray-<uid>`` (the shortest; made 0700)."""
    out = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute():
        out.append(Path(runtime) / "sum-ray")
    out.append(Path.home() / ".cache" / "sum-ray")
    out.append(Path("/tmp") / f"sum-ray-{os.getuid()}")
    return out


@dataclass
class ComponentState:
    name: str
    pid: int | None = None
    create_time: float | None = None
    port: int | None = None
    log: str = ""
    argv: list[str] = field(default_factory=list)
    #: ``[pid, create_time]`` of processes a dead predecessor left running a task (its executor workers), stopped
    #: by the next ``up`` once idle, or by ``down``.
    leftovers: list[list[float]] = field(default_factory=list)

    def process(self) -> psutil.Process | None:
        """The running process, or None (gone, or its pid reused by another program)."""
        if self.pid is None:
            return None
        try:
            proc = psutil.Process(self.pid)
            if self.create_time is not None and abs(proc.create_time() - self.create_time) > 1.0:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    @property
    def running(self) -> bool:
        return self.process() is not None

    def leftover_processes(self) -> list[psutil.Process]:
        """What this component's dead predecessor left running (see :attr:`leftovers`), or its own session's
        processes once its main process is gone: a killed process's children are reparented, not killed."""
        found: dict[int, psutil.Process] = {}
        for pid, created in self.leftovers:
            try:
                p = psutil.Process(int(pid))
                if abs(p.create_time() - created) <= 1.0 and _alive(p):
                    found[p.pid] = p
            except psutil.Error:
                pass
        if self.pid is not None and not self.running:
            for p in psutil.process_iter(["create_time"]):
                try:
                    if (p.pid != self.pid and os.getsid(p.pid) == self.pid and _alive(p)
                            and (self.create_time is None or p.info["create_time"] >= self.create_time - 1.0)):
                        found[p.pid] = p
                except (psutil.Error, OSError):
                    pass
        return list(found.values())


@dataclass
class ComponentStatus:
    name: str
    running: bool
    pid: int | None
    port: int | None
    listening: bool | None
    log: str
    log_tail: str = ""


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Stack:
    """The workspace's deployed stack.

    Example::

        stack = Stack(load_params(), Workspace(load_params().workspace))
        stack.up()               # idempotent
        print(stack.status())
        stack.down()
    """

    def __init__(self, params: Params, ws: Workspace):
        self.params = params
        self.ws = ws
        self.dir = ws.stack_dir
        self.logs = self.dir / "logs"

    # -- files -----------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "stack.json"

    @property
    def token_path(self) -> Path:
        return self.dir / "ray_auth_token"

    @property
    def passwords_file(self) -> Path:
        return self.dir / "airflow_passwords.json"

    @property
    def ray_temp_dir(self) -> Path:
        """Ray's temp dir: ``stack/ray``, or ``<a per-user folder>/<hash of stack/>`` when that path is too long.

        Ray's unix sockets live under its temp dir and their paths may not exceed 107 bytes; Ray adds
        "/session_<date>_<time>_<usec>_<pid>/sockets/dash_MetricsHead" (67 bytes with a 5-digit pid, the
        dashboard's modules have the longest names) and a fresh clone's ".sum/workspace/stack/ray" went
        over by 3 bytes (the head died at start). Room for 80 bytes. Ray makes its folders 0777, so the parent
        is only its owner's (``stack/``, or :func:`ray_temp_parents`' folder; checked by :meth:`_private_ray_temp_dir`).
        """
        path = self.dir / "ray"
        if len(str(path)) + RAY_SOCKET_SUFFIX > UNIX_PATH_MAX:
            name = hashlib.sha256(str(self.dir).encode()).hexdigest()[:10]
            fitting = [p / name for p in ray_temp_parents() if len(str(p / name)) + RAY_SOCKET_SUFFIX <= UNIX_PATH_MAX]
            path = fitting[0] if fitting else ray_temp_parents()[-1] / name
        return path

    def _private_ray_temp_dir(self) -> Path:
        """Makes the parent of :attr:`ray_temp_dir` (mode 0700) and checks it: a real folder (no symlink) of this
        user, closed to others; returns the temp dir.

        Raises:
            StackError: the parent is a symlink, another user's, or open to others (someone could swap Ray's
                sockets, logs or the code it ships to workers).
        """
        path = self.ray_temp_dir
        parent = path.parent
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = parent.lstat()
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise StackError(f"{parent}, the parent of Ray's temp dir, is a symlink or not a folder: remove it "
                             f"(`sumctl up` makes a private folder there)")
        if st.st_uid != os.getuid():
            raise StackError(f"{parent}, the parent of Ray's temp dir, belongs to uid {st.st_uid}, not to you: "
                             f"remove it or run with a shorter workspace path")
        if stat.S_IMODE(st.st_mode) & 0o077:
            parent.chmod(0o700)
        if path.is_symlink():
            raise StackError(f"Ray's temp dir {path} is a symlink: remove it")
        return path

    def _states(self) -> dict[str, ComponentState]:
        if not self.state_file.exists():
            return {}
        raw = read_json(self.state_file)
        return {name: ComponentState(**entry) for name, entry in raw.get("components", {}).items()}

    def _save(self, states: dict[str, ComponentState]) -> None:
        write_json(self.state_file, {
            "workspace": str(self.ws.root),
            "airflow_url": self.airflow_url,
            "ray_address": self.ray_address,
            "ray_dashboard": self.ray_dashboard,
            "serving_url": f"http://{self.params.serving.host}:{self.params.serving.port}",
            "passwords_file": str(self.passwords_file),
            "components": {name: asdict(s) for name, s in states.items()},
        })
        self.state_file.chmod(0o600)  # every file of stack/ is its owner's (the test of the stack checks all)

    def _secret(self, name: str, make: Callable[[], str] = lambda: secrets.token_hex(32)) -> str:
        """A secret generated once per workspace (by ``make``), in a file only its owner can read."""
        self._make_private()
        return owner_only_secret(self.dir / name, make)

    def _make_private(self) -> None:
        """``stack/``, its ``logs/`` and the Airflow home only for their owner (0700), every log 0600: the logs
        and Airflow's DB hold what tasks said, and a log written before this (``sumctl.log``) is tightened too."""
        for folder in (self.dir, self.logs, self.ws.airflow_home):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            folder.chmod(0o700)
        for path in self.logs.iterdir():
            if path.is_file() and not path.is_symlink():
                path.chmod(0o600)

    def _airflow_passwords(self) -> None:
        """Writes the admin's password into the simple auth manager's passwords file (0600) before the API
        server first starts: Airflow appends to an existing file and prints a password only when it generates
        one, so the password is in this file and nowhere else (no log holds it)."""
        def generated() -> str:
            return json.dumps({AIRFLOW_USER: secrets.token_urlsafe(18)})

        owner_only_secret(self.passwords_file, generated)
        if self.airflow_password() is None:  # an empty or foreign file: Airflow would generate (and print) one
            log.warning("up: %s has no password for %s; writing a new one", self.passwords_file, AIRFLOW_USER)
            self.passwords_file.unlink()
            owner_only_secret(self.passwords_file, generated)

    # -- addresses -------------------------------------------------------------------------------
    @property
    def airflow_url(self) -> str:
        cfg = self.params.airflow
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        return f"http://{host}:{cfg.port}"

    @property
    def ray_address(self) -> str:
        return f"{self.params.ray.node_ip}:{self.params.ray.gcs_port}"

    @property
    def ray_dashboard(self) -> str:
        return f"http://{self.params.ray.dashboard_host}:{self.params.ray.dashboard_port}"

    def airflow_password(self) -> str | None:
        """The generated password of :data:`AIRFLOW_USER` (None before the API server first started)."""
        try:
            return json.loads(self.passwords_file.read_text()).get(AIRFLOW_USER)
        except (OSError, ValueError):
            return None

    def database_url(self) -> str:
        """The metadata DB of the ``airflow.metadata_db`` profile (PostgreSQL: made ready first)."""
        return database_url(self.params, self.ws)

    # -- environments ----------------------------------------------------------------------------
    def ray_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(token_env(self.token_path))
        env.update({
            # Every process of the stack carries the workspace's identity (Ray's and Airflow's children inherit
            # it): `down` finds them by it when the state files are gone (:meth:`live_processes`).
            IDENTITY_ENV: self.ws.claim(),
            "PATH": f"{_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            # The read path (the SOAP ingress and its HTTP server) is a Ray worker, reniced to 15 unless told.
            "RAY_worker_niceness": str(self.params.serving.ray_worker_niceness),
            # On SIGTERM `ray start --block` first drains its node for up to 30 s, waiting for Serve to move
            # its replicas to another node. The stack has one node, and `down` stops all of it.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        })
        return env

    def airflow_env(self, database_url: str) -> dict[str, str]:
        """The environment of every Airflow component (and so of every task process they start)."""
        cfg = self.params.airflow
        env = self.ray_env()
        env.update(airflow_env.stack_environment(
            self.ws.airflow_home, dags_folder=PROJECT_ROOT / "dags", host=cfg.host, port=cfg.port,
            jwt_secret=self._secret("airflow_jwt_secret"), api_secret_key=self._secret("airflow_secret_key"),
            fernet_key=self._secret("airflow_fernet_key", lambda: Fernet.generate_key().decode()), users=f"{AIRFLOW_USER}:admin", parallelism=cfg.parallelism,
            sql_alchemy_conn=database_url))
        env.update({
            "SUM_PARAMS": os.environ.get("SUM_PARAMS", str(self.params.base_dir / "params.yaml")),
            "SUM_WORKSPACE": str(self.ws.root),
            "SUM_RAY_ADDRESS": "stack",  # tasks attach to this stack's Ray head, never start their own
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__API__WORKERS": "2",  # the execution API (task processes) and the public API must not queue
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        })
        if cfg.host in ("0.0.0.0", ""):
            env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"{self.airflow_url}/execution/"
            env["AIRFLOW__API__BASE_URL"] = self.airflow_url
        return env

    def component_env(self, name: str, env: dict[str, str]) -> dict[str, str]:
        """The scheduler also loads ``airflow_settings/airflow_local_settings.py``: its workers, and every task
        process they fork, start with the DAG's heavy modules already imported. Its idle loop sleeps
        ``airflow.scheduler_idle_sleep_seconds``: the next task of a run starts at its next loop."""
        if name != "scheduler":
            return env
        path = os.pathsep.join(p for p in (str(PROJECT_ROOT / "airflow_settings"), env.get("PYTHONPATH")) if p)
        idle_sleep = str(self.params.airflow.scheduler_idle_sleep_seconds)
        return env | {"PYTHONPATH": path, "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": idle_sleep}

    # -- components ------------------------------------------------------------------------------
    @property
    def components(self) -> tuple[str, ...]:
        """This stack's components in start order: ``redis`` (the Redis online store profile), the Ray head,
        its worker nodes (``ray.worker_nodes``, each a raylet of its own joined to the head), Airflow's."""
        redis = ("redis",) if self.params.feature_store.online_store == "redis" else ()
        workers = tuple(f"ray-worker-{i}" for i in range(1, self.params.ray.worker_nodes + 1))
        return (*redis, "ray", *workers, *AIRFLOW_COMPONENTS)

    def _argv(self, name: str) -> list[str]:
        r, a = self.params.ray, self.params.airflow
        if name == "redis":
            return redis_server.argv(self.params)
        # `ray start`, keeping the loopback node IP (serving.ray_node); the agents' HTTP on a free port (two nodes
        # and other Rays on this machine would otherwise race for 52365).
        ray_start = [sys.executable, "-m", "serving.ray_node", "start", "--block", "--disable-usage-stats",
                     f"--node-ip-address={r.node_ip}", "--dashboard-agent-listen-port=0"]
        if name.startswith("ray-worker-"):
            return [*ray_start, f"--address={self.ray_address}", f"--num-cpus={r.worker_num_cpus}",
                    f"--object-store-memory={r.worker_object_store_mb * 1024 * 1024}",
                    f"--resources={json.dumps({WORKER_NODE_RESOURCE: 1})}"]
        if name == "ray":
            return [*ray_start, "--head", f"--port={r.gcs_port}", f"--ray-client-server-port={r.client_server_port}",
                    f"--num-cpus={r.num_cpus}",
                    f"--object-store-memory={r.object_store_mb * 1024 * 1024}",
                    "--include-dashboard=true", f"--dashboard-host={r.dashboard_host}",
                    f"--dashboard-port={r.dashboard_port}", f"--temp-dir={self.ray_temp_dir}"]
        if name == "api-server":
            return [str(_BIN / "airflow"), "api-server", "--host", a.host, "--port", str(a.port)]
        if name in ("scheduler", "triggerer"):
            # No task-log server: it listens on every interface, and the api-server reads the task logs
            # from the files under the stack's Airflow home, on this machine.
            return [str(_BIN / "airflow"), name, "--skip-serve-logs"]
        return [str(_BIN / "airflow"), name]

    def _port(self, name: str) -> int | None:
        return {"ray": self.params.ray.gcs_port, "api-server": self.params.airflow.port,
                "redis": self.params.feature_store.redis.port}.get(name)

    def _spawn(self, name: str, env: dict[str, str]) -> ComponentState:
        self._make_private()
        log_path = self.logs / f"{name}.log"
        argv = self._argv(name)
        with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            # A session of its own: the component outlives sumctl, and down stops its whole group.
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(self.dir), start_new_session=True,
                                    umask=0o077)  # what a component writes (logs, DBs, Ray's session files) is private
        return ComponentState(name=name, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(),
                              port=self._port(name), log=str(log_path), argv=argv)

    def _wait(self, state: ComponentState, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not state.running:
                raise StackError(f"{state.name} exited while starting; its log {state.log} ends with:\n"
                                 f"{_tail(Path(state.log))}")
            time.sleep(0.5)
        raise StackError(f"{state.name} not ready after {timeout:.0f}s; its log {state.log} ends with:\n"
                         f"{_tail(Path(state.log))}")

    def _ready(self, name: str) -> Callable[[], bool]:
        if name == "ray":
            return lambda: _listening(self.params.ray.node_ip, self.params.ray.gcs_port)
        if name == "redis":
            return lambda: redis_server.ping(self.params)
        if name.startswith("ray-worker-"):
            # `ray start --block` says so once its raylet has registered with the head.
            log_file = self.logs / f"{name}.log"
            start = log_file.stat().st_size if log_file.exists() else 0

            def joined() -> bool:
                with open(log_file, "rb") as fh:
                    fh.seek(start)
                    return b"Ray runtime started" in fh.read()

            return joined
        if name == "api-server":
            url = f"{self.airflow_url}/api/v2/monitor/health"

            def api_ready() -> bool:
                import httpx

                try:
                    return httpx.get(url, timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            return api_ready
        return lambda: True

    # -- the commands ----------------------------------------------------------------------------
    def up(self, deploy: Callable[["Stack"], Any] | None = None, on_step: Callable[[str], None] = lambda s: None
           ) -> dict[str, Any]:
        """Starts whatever is not running (after clearing what dead components left: :meth:`_clear_after_crashes`);
        returns :meth:`info`.

        Args:
            deploy: Called once Ray is up (the SOAP application with the production snapshot).
            on_step: Told each step as it begins (a progress display).

        Raises:
            StackError: A component did not come up (the message holds its log tail).
        """
        if not is_loopback(self.params.ray.node_ip):
            raise StackError(f"ray.node_ip {self.params.ray.node_ip!r} is not a loopback address: every server of a "
                             "Ray node listens on it, and Ray's Prometheus exporters (the autoscaler's, the dashboard's, "
                             "the agents' metrics export port) answer anyone without authentication; the stack's Ray "
                             "runs on 127.0.0.1")
        self._make_private()
        self.ws.claim()
        self._secret("ray_auth_token")
        self._private_ray_temp_dir()
        states = self._states()
        self._clear_after_crashes(states)
        started: list[str] = []
        setting = {"ray": "ray.gcs_port", "api-server": "airflow.port", "redis": "feature_store.redis.port"}
        for name in setting:
            port = self._port(name)
            if (name in self.components and not (states.get(name) and states[name].running)
                    and _listening("127.0.0.1", port)):
                raise StackError(f"port {port} for {name} is taken by another program; stop it or "
                                 f"change params.yaml ({setting[name]})")
        # Redis and Ray first, ready and serving before Airflow's components start: started side by side, their
        # imports starve the new head, and the SOAP deploy's driver timed out waiting for the GCS (seen on a fresh
        # `make run`); in parallel the whole `up` was no faster on 2 cores. Worker nodes join before the deploy,
        # so the compute replicas are placed across the nodes.
        for name in self.components:
            if name in AIRFLOW_COMPONENTS or (states.get(name) and states[name].running):
                continue
            on_step({"redis": "starting Redis (the online store)", "ray": "starting the Ray head"}.get(
                name, f"starting the Ray worker node {name}"))
            ready = self._ready(name)  # before the spawn: a worker's readiness reads its log from here on
            states[name] = self._spawn(name, self.ray_env())
            self._save(states)
            self._wait(states[name], ready, 120)
            started.append(name)
        record_cluster(self.ws, self.ray_address, self.token_path, self.ray_dashboard)
        if deploy is not None:
            on_step("deploying the SOAP application")
            deploy(self)

        on_step("preparing the Airflow metadata DB")
        self._airflow_passwords()
        env = self.airflow_env(self.database_url())
        airflow_env.migrate(self.ws.airflow_home, env)
        for name in AIRFLOW_COMPONENTS:
            if states.get(name) and states[name].running:
                continue
            on_step(f"starting Airflow's {name}")
            left = states[name].leftovers if name in states else []  # a dead predecessor's, still finishing
            states[name] = self._spawn(name, self.component_env(name, env))
            states[name].leftovers = left
            self._save(states)
            started.append(name)
        for name in started:
            if name in AIRFLOW_COMPONENTS:
                on_step(f"waiting for Airflow's {name}")
                self._wait(states[name], self._ready(name), 180)
        self._save(states)
        return self.info() | {"started": started}

    def _clear_after_crashes(self, states: dict[str, ComponentState]) -> None:
        """Before ``up`` restarts what died: stops what a dead component left behind, and a dead head's worker nodes.

        A component killed alone (SIGKILL, the OOM killer) leaves its children running: a head's GCS or raylet
        holding its port, an api-server's workers, a scheduler's executor workers. They are stopped, except a
        dead scheduler's executor workers that are still running a task: the task finishes and reports to the
        API server (the new scheduler takes the run on from there); they are recorded and stopped by the next
        ``up`` once idle, or by ``down``. Worker nodes joined to a head that died cannot join the new one (a new
        GCS is a new cluster): they are restarted after it.
        """
        head = states.get("ray")
        for name, state in states.items():
            procs = state.leftover_processes()
            if not procs:
                continue
            keep: dict[int, psutil.Process] = {}
            if name == "scheduler":
                for p in procs:
                    tree = _tree(p)
                    if len(tree) > 1:  # a worker with its task's supervisor (and the task) below it
                        keep.update({c.pid: c for c in tree})
            stop = [p for p in procs if p.pid not in keep]
            if stop:
                log.warning("up: stopping what the dead %s left running: %s", name, _described(stop))
                # An executor worker ignores SIGTERM (it inherited the scheduler's handler, which acts in the
                # parent only); the others get a chance to stop cleanly.
                _terminate(stop, grace=0.0 if name == "scheduler" else 5.0)
            state.leftovers = [[p.pid, p.create_time()] for p in keep.values() if _alive(p)]
            if keep:
                log.warning("up: the dead %s's executor workers still run a task, left to finish: %s",
                            name, _described(list(keep.values())))
        if head is not None and not head.running:
            for name in self.components:
                worker = states.get(name)
                if name.startswith("ray-worker-") and worker is not None and worker.running:
                    log.warning("up: the Ray head died; restarting worker node %s after it", name)
                    tree = _tree(worker.process())
                    try:
                        os.kill(worker.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
                    except (ProcessLookupError, PermissionError):
                        pass
                    _, alive = psutil.wait_procs(tree, timeout=10)
                    _terminate(alive)
        self._save(states)

    def info(self) -> dict[str, Any]:
        return {
            "airflow_url": self.airflow_url, "airflow_user": AIRFLOW_USER,
            "passwords_file": str(self.passwords_file), "ray_address": self.ray_address,
            "ray_dashboard": self.ray_dashboard,
            "serving_url": f"http://{self.params.serving.host}:{self.params.serving.port}",
            "logs": str(self.logs),
        }

    def status(self) -> list[ComponentStatus]:
        """Each component: running or not, pid, port (and whether it answers), log, and a dead one's log tail."""
        out = []
        states = self._states()
        for name in self.components:
            s = states.get(name)
            if s is None:
                out.append(ComponentStatus(name, False, None, self._port(name), None, "", "never started"))
                continue
            running = s.running
            host = {"ray": self.params.ray.node_ip, "redis": self.params.feature_store.redis.host}.get(name, "127.0.0.1")
            listening = _listening(host, s.port) \
                if (s.port and running) else None
            out.append(ComponentStatus(name, running, s.pid, s.port, listening, s.log,
                                       "" if running else _tail(Path(s.log))))
        return out

    def is_up(self) -> bool:
        return all(c.running for c in self.status())

    def _processes(self, states: dict[str, ComponentState]) -> list[psutil.Process]:
        """Every live process of the stack: the components, their children, and Ray's (found by temp dir)."""
        procs: dict[int, psutil.Process] = {}
        for s in states.values():
            for p in (s.process(), *s.leftover_processes()):
                if p is None:
                    continue
                procs[p.pid] = p
                try:
                    for child in p.children(recursive=True):
                        procs[child.pid] = child
                except psutil.Error:
                    pass
        procs.update({p.pid: p for p in self._ray_processes(states)})
        return [p for p in procs.values() if p.pid != os.getpid()]

    def live_processes(self) -> list[psutil.Process]:
        """Every live process of this workspace's stack, so a stack whose state files were deleted is still found:
        those ``stack.json`` records (with their children and Ray's, see :meth:`_processes`), and every process of
        this user (with its children) whose environment carries the workspace's identity (:data:`IDENTITY_ENV`) or
        whose output goes to one of the stack's logs. The second covers the components that set their process title
        (Airflow's api-server and scheduler, Redis): the title overwrites what ``/proc/<pid>/environ`` shows."""
        procs = {p.pid: p for p in self._processes(self._states())}
        ident = self.ws.identity()
        me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        for p in psutil.process_iter(["uids"]):
            if p.pid in procs or p.pid in me or p.info["uids"] is None or p.info["uids"].real != os.getuid():
                continue
            try:
                ours = (ident is not None and p.environ().get(IDENTITY_ENV) == ident) or self._logs_to_ours(p.pid)
                if ours and _alive(p):
                    procs.update({q.pid: q for q in _tree(p) if q.pid not in me})
            except (psutil.Error, OSError):
                pass
        return list(procs.values())

    def _logs_to_ours(self, pid: int) -> bool:
        """Whether the process's stdout is a log of this stack (a component's, or what it started; also once deleted)."""
        try:
            target = os.readlink(f"/proc/{pid}/fd/1")
        except OSError:
            return False
        return target.removesuffix(" (deleted)").startswith(f"{self.logs}{os.sep}")

    def _recovered(self, procs: list[psutil.Process]) -> dict[str, ComponentState]:
        """The components among ``procs`` (each the leader of a session of its own), named from their command
        line: what ``down`` stops in order when ``stack.json`` is gone."""
        found: dict[str, ComponentState] = {}
        for p in procs:
            try:
                if os.getsid(p.pid) != p.pid:
                    continue
                argv = p.cmdline()
                created = p.create_time()
            except (psutil.Error, OSError):
                continue
            # [python, .../bin/ray, start, ...] or a title a program set itself ("airflow scheduler", Redis's)
            words = [Path(w).name.replace("_", "-") for a in argv for w in a.split()]  # "airflow api_server -- ..."
            after = dict(zip(words, words[1:]))
            if any(w.startswith("redis-server") for w in words):
                name = "redis"
            elif after.get("ray") == "start" or after.get("serving.ray-node") == "start":
                name = "ray" if "--head" in words else f"ray-worker-pid{p.pid}"
            elif after.get("airflow") in AIRFLOW_COMPONENTS:
                name = after["airflow"]
            else:
                continue
            found[name] = ComponentState(name=name, pid=p.pid, create_time=created, argv=argv)
        return found

    def down(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stops every component; SIGKILL for what outlives ``timeout``.

        Airflow first, then Ray. Each Airflow component gets one SIGTERM to its process group (a second
        signal to the scheduler's workers makes it wait for them forever); Ray's ``ray start --block`` gets
        one to itself and stops its node in order, the GCS last, in a few seconds (signalling every Ray
        process at once leaves the raylet retrying the GCS for half a minute). Each gets half of ``timeout``;
        whatever is left then (a Serve replica, a task process in a session of its own) gets SIGTERM, five
        seconds, and SIGKILL.

        Returns:
            ``{"stopped": [names], "pids": [every pid that was running], "left": [pids still alive]}``.
        """
        states = self._states()
        procs = self.live_processes()
        states = self._recovered(procs) | states
        pids = sorted(p.pid for p in procs)
        # What a dead scheduler left finishing a task (see _clear_after_crashes) ignores SIGTERM: killed first.
        leftovers = [q for s in states.values() for p in s.leftover_processes() for q in _tree(p)]
        if leftovers:
            log.warning("down: killing what dead components left running: %s", _described(leftovers))
            _terminate(leftovers, grace=0.0)
        names = [n for n in dict.fromkeys((*self.components, *states)) if n in states]  # also a dropped profile's
        stopped = [name for name in reversed(names) if states[name].running]
        ray_pids = {p.pid for p in self._ray_processes(states)}
        worker_pids = {p.pid for n in stopped if n.startswith("ray-worker-") for p in _tree(states[n].process())}
        redis_pids = {p.pid for p in _tree(states["redis"].process())} if "redis" in stopped else set()
        other = ray_pids | worker_pids | redis_pids
        # Airflow, then the worker nodes (their replicas write to the store), the head, Redis last.
        groups = (
            ([n for n in stopped if n in AIRFLOW_COMPONENTS], [p for p in procs if p.pid not in other]),
            ([n for n in stopped if n.startswith("ray-worker-")], [p for p in procs if p.pid in worker_pids]),
            ([n for n in stopped if n == "ray"], [p for p in procs if p.pid in ray_pids - worker_pids]),
            ([n for n in stopped if n == "redis"], [p for p in procs if p.pid in redis_pids]),
        )
        for names, group in groups:
            for name in names:
                try:  # `ray start` alone: signalled with its group, the node's processes race each other
                    (os.killpg if name in AIRFLOW_COMPONENTS else os.kill)(states[name].pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
            t0 = time.monotonic()
            _, alive = psutil.wait_procs(group, timeout=timeout / 2)
            log.info("down: %s stopped in %.1fs%s", "/".join(names) or "-", time.monotonic() - t0,
                     f"; still running: {_described(alive)}" if alive else "")
        for p in procs:
            if _alive(p):
                try:
                    p.terminate()
                except psutil.Error:
                    pass
        psutil.wait_procs(procs, timeout=5)
        alive = [p for p in procs if _alive(p)]
        if alive:
            log.warning("down: killing what outlived SIGTERM: %s", _described(alive))
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        left = sorted(p.pid for p in alive)
        forget_cluster(self.ws)
        if self.state_file.exists():
            self.state_file.unlink()
        return {"stopped": stopped, "pids": pids, "left": left}

    def _ray_processes(self, states: dict[str, ComponentState]) -> list[psutil.Process]:
        """The Ray head's processes: `ray start`'s and every process that names the head's temp dir."""
        found: dict[int, psutil.Process] = {}
        head = states.get("ray")
        p = head.process() if head else None
        if p is not None:
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
        marker = str(self.ray_temp_dir)
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in (p.info["cmdline"] or [])):
                    found[p.pid] = p
            except psutil.Error:
                pass
        return list(found.values())


def _tree(proc: psutil.Process | None) -> list[psutil.Process]:
    """A process and its descendants (none for None)."""
    if proc is None:
        return []
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _terminate(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM, ``grace`` seconds, then SIGKILL for what is left (``grace`` 0: SIGKILL at once)."""
    for p in procs if grace > 0 else ():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace) if grace > 0 else ([], procs)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _described(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            out.append(str(p.pid))
    return "; ".join(out)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def require_stack(ws: Workspace) -> None:
    """Raises :class:`StackError` naming ``sumctl up`` when the workspace has no recorded stack."""
    if cluster_record(ws) is None:
        raise StackError(f"the stack of {ws.root} is not running: start it with `sumctl up`")
