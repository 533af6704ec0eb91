"""Real processes for the OpenHands tests: convsvc (run from the main venv, whose path
scripts/test-openhands passes in CONVSVC_SERVER_BIN) and OpenHands' own web server under
uvicorn, with RemoteConversationManager selected by CONVERSATION_MANAGER_CLASS."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.openhands.fake_llm import FakeLLM
from tests.postgres import PostgresServer, postgres_server

MANAGER_CLASS = "convclient.openhands.RemoteConversationManager"
LLM_KEY = "sk-convsvc-test-4f1b2c3d9e8a7b6c"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    ready: Callable[[], bool],
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready in {timeout}s:\n{log.read_text()[-5000:]}")
        time.sleep(0.1)  # polling another process's start-up; there is no event to wait on


@dataclass
class Convsvc:
    """A `convsvc serve` process on a fixed port, so that it can restart at the same address."""

    data_dir: Path
    log_path: Path
    address: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)

    def start(self) -> None:
        binary = os.environ.get("CONVSVC_SERVER_BIN")
        assert binary, (
            "CONVSVC_SERVER_BIN must name the convsvc console script "
            "(scripts/test-openhands sets it)"
        )
        ready = self.data_dir.parent / f"convsvc-ready-{time.monotonic_ns()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
        env.update(self.extra_env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "serve",
                    "--listen",
                    self.address,
                    "--data-dir",
                    str(self.data_dir),
                    "--ready-file",
                    str(ready),
                    *self.extra_args,
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        wait_until(ready.exists, "convsvc", self.process, self.log_path, 30)

    def restart(self, how: signal.Signals = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(how)
        self.process.wait(30)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def stored_and_logged_bytes(self) -> bytes:
        """Everything convsvc wrote: its data directory and its log."""
        blobs = [p.read_bytes() for p in self.data_dir.rglob("*") if p.is_file()]
        return b"".join(blobs) + self.log_path.read_bytes()


@dataclass
class OpenHandsServer:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def convsvc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Convsvc]:
    root = tmp_path_factory.mktemp("convsvc")
    server = Convsvc(root / "data", root / "convsvc.log")
    server.start()
    yield server
    server.stop()


def start_openhands(
    root: Path, convsvc_address: str, name: str = "openhands", **extra_env: str
) -> OpenHandsServer:
    port = free_port()
    log_path = root / f"{name}.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")},
        "SERVE_FRONTEND": "false",
        "FILE_STORE_PATH": str(root / "file-store"),
        "CONVERSATION_MANAGER_CLASS": MANAGER_CLASS,
        "CONVSVC_ADDRESS": convsvc_address,
        # DELETE /api/conversations/{id} also asks the configured runtime class to delete the
        # conversation's sandbox; the web tier runs none, and the default (docker) needs a
        # Docker daemon for that. The README tells operators the same.
        "RUNTIME": "local",
        **extra_env,
    }
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "openhands.server.listen:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/api/options/config", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, "OpenHands", process, log_path, 120)
    return OpenHandsServer(url, log_path, process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def openhands(
    tmp_path_factory: pytest.TempPathFactory, convsvc: Convsvc
) -> Iterator[OpenHandsServer]:
    server = start_openhands(tmp_path_factory.mktemp("openhands"), convsvc.address)
    yield server
    stop_process(server.process)


@pytest.fixture(scope="module")
def redis_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's package; scripts/test-openhands installs it)."""
    binary = shutil.which("redis-server")
    assert binary, "the multi-replica test needs redis-server (apt-get install redis-server)"
    root = tmp_path_factory.mktemp("redis")
    port = free_port()
    log_path = root / "redis.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(root),
            ],
            stdout=log,
            stderr=log,
        )

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(answers, "redis-server", process, log_path, 30)
    yield f"127.0.0.1:{port}"
    stop_process(process)


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, convsvc: Convsvc, redis_address: str
) -> Iterator[tuple[OpenHandsServer, OpenHandsServer]]:
    """Two OpenHands web servers sharing a file store and a Redis socket.io manager."""
    root = tmp_path_factory.mktemp("replicas")
    first = start_openhands(root, convsvc.address, "replica-a", REDIS_HOST=redis_address)
    second = start_openhands(root, convsvc.address, "replica-b", REDIS_HOST=redis_address)
    yield first, second
    stop_process(first.process)
    stop_process(second.process)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL (Debian's package; scripts/test-openhands installs it)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def cluster_nodes(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[tuple[Convsvc, Convsvc]]:
    """Two convsvc nodes sharing one PostgreSQL database."""
    root = tmp_path_factory.mktemp("cluster")
    env = {"CONVSVC_DATABASE_URL": postgres.create_database()}
    nodes = (
        Convsvc(root / "a", root / "node-a.log", extra_env=env),
        Convsvc(root / "b", root / "node-b.log", extra_env=env),
    )
    for node in nodes:
        node.start()
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def cluster_replicas(
    tmp_path_factory: pytest.TempPathFactory,
    cluster_nodes: tuple[Convsvc, Convsvc],
    redis_address: str,
) -> Iterator[tuple[OpenHandsServer, OpenHandsServer]]:
    """Two OpenHands web servers sharing Redis, each talking to a different convsvc node."""
    root = tmp_path_factory.mktemp("cluster-replicas")
    first = start_openhands(root, cluster_nodes[0].address, "replica-a", REDIS_HOST=redis_address)
    second = start_openhands(root, cluster_nodes[1].address, "replica-b", REDIS_HOST=redis_address)
    yield first, second
    stop_process(first.process)
    stop_process(second.process)


# -- agent workers: real OpenHands agents on convworker processes -------------------------

MICROAGENT = """---
name: convsvc-test
type: knowledge
version: 1.0.0
agent: CodeActAgent
triggers:
- convsvc-test
---
A knowledge microagent the tests install for the web tier.
"""

AGENT_CONVSVC_ENV = {
    "CONVSVC_ENGINE__DEFAULT_AGENT": "openhands",
    # A killed worker's stream breaks at once; silence is the backstop.
    "CONVSVC_WORKERS__PING_INTERVAL_SECONDS": "1",
    "CONVSVC_WORKERS__SILENCE_TIMEOUT_SECONDS": "5",
}


@dataclass
class AgentWorker:
    """A ``convworker`` process running OpenHands in this venv."""

    worker_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    workspace_root: Path

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_agent_worker(root: Path, convsvc_address: str, worker_id: str) -> AgentWorker:
    log_path = root / f"{worker_id}.log"
    workspace_root = root / f"{worker_id}-workspaces"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")},
        "LLM_NUM_RETRIES": "0",  # the fake LLM answers at once or the test fails
    }
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convworker",
                "--address",
                convsvc_address,
                "--worker-id",
                worker_id,
                "--kind",
                "openhands",
                "--workspace-root",
                str(workspace_root),
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=log,
        )
    # The worker attaches once its zygote has imported OpenHands (about ten seconds).
    wait_until(
        lambda: "attached to" in log_path.read_text(errors="replace"),
        f"worker {worker_id}",
        process,
        log_path,
        120,
    )
    return AgentWorker(worker_id, process, log_path, workspace_root)


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLM]:
    llm = FakeLLM().start()
    yield llm
    llm.stop()


@pytest.fixture(scope="module")
def agent_convsvc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Convsvc]:
    root = tmp_path_factory.mktemp("agent-convsvc")
    server = Convsvc(root / "data", root / "convsvc.log", extra_env=AGENT_CONVSVC_ENV)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def agent_workers(
    tmp_path_factory: pytest.TempPathFactory, agent_convsvc: Convsvc
) -> Iterator[list[AgentWorker]]:
    """Workers attached to ``agent_convsvc``; tests may start more and kill them."""
    root = tmp_path_factory.mktemp("workers")
    workers = [start_agent_worker(root, agent_convsvc.address, "worker-a")]
    yield workers
    for worker in workers:
        if worker.process.poll() is None:
            stop_process(worker.process)


@pytest.fixture(scope="module")
def agent_openhands(
    tmp_path_factory: pytest.TempPathFactory, agent_convsvc: Convsvc
) -> Iterator[OpenHandsServer]:
    root = tmp_path_factory.mktemp("agent-openhands")
    # A user microagent (OpenHands reads ~/.openhands/microagents) for the /microagents route.
    microagents = root / "home" / ".openhands" / "microagents"
    microagents.mkdir(parents=True)
    (microagents / "convsvc-test.md").write_text(MICROAGENT)
    server = start_openhands(root, agent_convsvc.address, HOME=str(root / "home"))
    yield server
    stop_process(server.process)
