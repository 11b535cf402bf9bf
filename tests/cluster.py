"""Real services for the deployment tests: PostgreSQL, an `mlflow server` on it, a multi-node Ray cluster.

Each is a context manager that starts real processes on this machine (ports picked free, clients use
127.0.0.1), waits until they answer, and on exit stops every process it started, also after a failure:
process groups get SIGTERM then SIGKILL, and Ray processes that left their group are found by their
unique temp dir in /proc.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (outside Ray's worker range, which is set per node below)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    """Poll `check()` until it returns a truthy value (returned) or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if result := check():
                return result
        except ProcessLookupError:
            raise
        except (OSError, subprocess.SubprocessError, ValueError):  # not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout_s:.0f}s")
        time.sleep(interval_s)


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` in its own session (so its whole process group can be stopped), output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group of `proc`, SIGKILL it after `grace_s`, reap `proc`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # children left in the group
            return
        except subprocess.TimeoutExpired:
            continue


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose command line contains `marker` (a temp dir only our processes use)."""
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker in Path(cmdline).read_bytes().decode(errors="replace"):
                os.kill(int(Path(cmdline).parent.name), signal.SIGKILL)


# --- PostgreSQL -------------------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """Directory of Debian's PostgreSQL server binaries (initdb, pg_ctl), newest version, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def postgres(database: str = "mlflow") -> Iterator[str]:
    """A fresh PostgreSQL cluster in a temp dir on a free loopback port; yields the SQLAlchemy database URI.

    PostgreSQL refuses to run as root, so as root (CI) the cluster belongs to the `postgres` user.
    """
    pg_bin = postgres_bin()
    if pg_bin is None:
        raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="fsw-pg-"))
    data, port = root / "data", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    pg_ctl = [*as_user, str(pg_bin / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            [*as_user, str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        subprocess.run(
            [*pg_ctl, "-o", options, "-l", str(root / "postgres.log"), "-w", "-t", "60", "start"],
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "-t", "30", "stop"], capture_output=True, timeout=60)
        kill_marked(str(data))
        shutil.rmtree(root, ignore_errors=True)


# Loopback servers are asked directly, whatever proxy the environment names.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- MLflow server ----------------------------------------------------------------------------------------------


class MlflowServer:
    """`mlflow server` on a PostgreSQL backend with proxied artifacts; stop() and start() keep its port."""

    def __init__(self, backend_uri: str, workdir: Path) -> None:
        self.backend_uri, self.workdir, self.port = backend_uri, workdir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = workdir / "mlflow-artifacts"
        self.log = workdir / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the server and wait until /health answers."""
        cmd = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", self.backend_uri,
            "--serve-artifacts", "--artifacts-destination", self.artifacts.as_uri(),
            "--allowed-hosts", f"127.0.0.1:{self.port},localhost:{self.port}",
        ]  # fmt: skip
        self.proc = start(cmd, self.log)
        wait_for(self.healthy, timeout_s, f"mlflow server on {self.url} (log: {self.log})")

    def healthy(self) -> bool:
        """True when the server process is up and /health answers 200."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited; see {self.log}")
        with DIRECT.open(f"{self.url}/health", timeout=2) as resp:
            return resp.status == 200

    def stop(self) -> None:
        """Stop the server (its uvicorn workers too)."""
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@contextlib.contextmanager
def mlflow_server(backend_uri: str, workdir: Path) -> Iterator[MlflowServer]:
    """A started MlflowServer, stopped on exit."""
    server = MlflowServer(backend_uri, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- Ray cluster ------------------------------------------------------------------------------------------------


class RayCluster:
    """A Ray head (no CPUs: it runs no trials) and worker nodes, each a separate `ray start --block` process.

    Worker i gets `--num-cpus 1` and the node label `fasweep-node=w<i>`, so trials can be traced to nodes.
    """

    def __init__(self, workdir: Path, workers: int = 2, cpus_per_worker: int = 1) -> None:
        # Unix socket paths must stay short: the temp dir lives directly under /tmp.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fsw-ray-", dir="/tmp"))
        self.workdir, self.n_workers, self.cpus = workdir, workers, cpus_per_worker
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        # Token auth with a token of this cluster's own (Ray >= 2.5x turns token auth on by itself when
        # ~/.ray/auth_token exists, which would lock out drivers that lack it); every node and driver gets
        # this env. Health checks tuned to notice a dead node within seconds instead of ~30 s.
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }

    def _node_args(self, index: int) -> list[str]:
        """Ports of one node: the agent port free (its default is fixed), a worker port range of its own."""
        low = 20000 + 200 * index
        return [
            "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 1024 * 1024),
            "--dashboard-agent-listen-port", str(free_port()),
            "--min-worker-port", str(low), "--max-worker-port", str(low + 199), "--block",
        ]  # fmt: skip

    def start(self) -> None:
        """Start the head and the workers and wait until all nodes are alive."""
        head = [
            str(BIN / "ray"), "start", "--head", "--port", str(self.port), "--num-cpus", "0",
            "--include-dashboard", "false", "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
            *self._node_args(0),
        ]  # fmt: skip
        self.head = start(head, self.workdir / "ray-head.log", self.env)
        wait_for(lambda: self._alive_nodes() >= 1, 90, f"Ray head at {self.address}")
        for i in range(1, self.n_workers + 1):
            self.add_worker(f"w{i}", i, expect_nodes=i + 1)

    def add_worker(self, name: str, index: int, expect_nodes: int, tries: int = 2) -> None:
        """Start worker node `name` (label fasweep-node=name) and wait until the cluster has `expect_nodes` alive.

        Ray gives a raylet 30 s to register; on a loaded machine that can pass, so a node that died starting
        is started once more.
        """
        cmd = [
            str(BIN / "ray"), "start", "--address", self.address, "--num-cpus", str(self.cpus),
            "--labels", f"fasweep-node={name}", *self._node_args(index),
        ]  # fmt: skip
        for attempt in range(tries):
            proc = self.workers[name] = start(cmd, self.workdir / f"ray-{name}.log", self.env)

            def joined(proc: subprocess.Popen[bytes] = proc) -> bool:
                if proc.poll() is not None:
                    raise ProcessLookupError(f"ray start for {name} exited")  # retried below
                return self._alive_nodes() >= expect_nodes

            try:
                wait_for(joined, 120, f"Ray worker node {name} (log: {self.workdir / f'ray-{name}.log'})")
                return
            except (TimeoutError, ProcessLookupError):
                stop(proc)
                if attempt == tries - 1:
                    raise

    def kill_worker(self, name: str) -> None:
        """Kill node `name` abruptly (SIGKILL to its raylet and everything in its process group)."""
        proc = self.workers.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def busy_nodes(self) -> set[str]:
        """Names of the worker nodes running a task or actor now (a `ray::` process under their raylet)."""
        groups = {proc.pid: name for name, proc in self.workers.items()}
        busy = set()
        for stat in glob.glob("/proc/[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError):
                pid = Path(stat).parent.name
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if not title.startswith("ray::") or title.startswith(_NOT_WORK):
                    continue
                ppid = int(Path(stat).read_text().rsplit(")", 1)[1].split()[1])
                if (name := groups.get(os.getpgid(ppid))) is not None:
                    busy.add(name)
        return busy

    def _alive_nodes(self) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _COUNT_NODES, self.address], capture_output=True, text=True, timeout=60, env=self.env
        )
        return int(out.stdout.strip() or 0)

    def stop(self) -> None:
        """Stop every node, then kill any Ray process still using this cluster's temp dir."""
        for proc in [*self.workers.values(), *([self.head] if self.head else [])]:
            stop(proc)
        self.workers.clear()
        self.head = None
        kill_marked(str(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# Ray's own processes under a raylet that run no user work.
_NOT_WORK = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")

# Counted in a child process: a driver in the test process would outlive the cluster it watches.
_COUNT_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""


@contextlib.contextmanager
def ray_cluster(workdir: Path, workers: int = 2) -> Iterator[RayCluster]:
    """A started RayCluster with `workers` worker nodes, stopped on exit."""
    cluster = RayCluster(workdir, workers)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
