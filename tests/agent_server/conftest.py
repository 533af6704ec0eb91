"""Real processes for the agent-server tests: convsvc (from the main venv, with the API on its
own port) and ``openhands-sdk`` workers from this venv, a stock agent-server 1.58.2 beside
them, and the scripted LLM. The client suite runs against both backends (``backend``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_server.fake_llm import SdkFakeLLM
from tests.openhands.conftest import Convsvc, free_port, stop_process, wait_until

KEY = "agent-server-test-key-5d1c9a7e3b"
"""The session key of both backends (convsvc's service token)."""
SDK_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "OPENHANDS_SUPPRESS_BANNER": "1"}
CONVSVC_ENV = {
    "CONVSVC_AUTH_TOKEN": KEY,
    # Conversations started without a user id all belong to one (anonymous) user: room for
    # every conversation of the suite, so that none is evicted under a test.
    "CONVSVC_ENGINE__MAX_CONCURRENT_CONVERSATIONS": "50",
    # A killed worker's stream breaks at once; silence is the backstop.
    "CONVSVC_WORKERS__PING_INTERVAL_SECONDS": "1",
    "CONVSVC_WORKERS__SILENCE_TIMEOUT_SECONDS": "5",
}


@dataclass
class Backend:
    """An agent-server API to test: its URL and how to reach its processes."""

    name: str
    url: str
    key: str = KEY
    convsvc: Convsvc | None = None
    workers: list[Worker] = field(default_factory=list)

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"X-Session-API-Key": key or self.key}, timeout=60
        )

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")


@dataclass
class Worker:
    """A ``convworker --kind openhands-sdk`` process."""

    worker_id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def start_worker(root: Path, address: str, worker_id: str, capacity: int = 16) -> Worker:
    log_path = root / f"{worker_id}.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")},
        **SDK_ENV,
        "CONVSVC_TOKEN": KEY,
    }
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convworker",
                "--address",
                address,
                "--worker-id",
                worker_id,
                "--kind",
                "openhands-sdk",
                "--capacity",
                str(capacity),
                "--workspace-root",
                str(root / f"{worker_id}-workspaces"),
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=log,
        )
    # It attaches once its zygote imported the SDK and its tools (seconds).
    wait_until(
        lambda: "attached to" in log_path.read_text(errors="replace"),
        f"worker {worker_id}",
        process,
        log_path,
        120,
    )
    return Worker(worker_id, process, log_path)


def start_convsvc(root: Path, **extra_env: str) -> tuple[Convsvc, str]:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = Convsvc(
        root / "data",
        root / "convsvc.log",
        extra_env={**CONVSVC_ENV, **extra_env},
        extra_args=["--agent-server-listen", f"127.0.0.1:{port}"],
    )
    server.start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[SdkFakeLLM]:
    llm = SdkFakeLLM()
    llm.start()
    yield llm
    llm.stop()


def start_stock(root: Path) -> tuple[Backend, subprocess.Popen[bytes]]:
    """A stock agent-server 1.58.2 process, as its users run it."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = root / "agent-server.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CONVSVC_", "OH_"))},
        **SDK_ENV,
        "OH_SESSION_API_KEYS_0": KEY,
    }
    command = [sys.executable, "-m", "openhands.agent_server", "--host", "127.0.0.1"]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=root, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(url), "stock agent-server", process, log_path, 120)
    return Backend("stock", url), process


@pytest.fixture(scope="session")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    backend, process = start_stock(tmp_path_factory.mktemp("stock"))
    yield backend
    stop_process(process)


@contextlib.contextmanager
def convsvc_backend(
    root: Path, workers: Sequence[tuple[str, int]] = (("worker-a", 16),), **env: str
) -> Iterator[Backend]:
    """convsvc serving the API, with openhands-sdk workers (id, capacity) attached; tests may
    kill either and start more."""
    server, url = start_convsvc(root, **env)
    backend = Backend("convsvc", url, convsvc=server)
    try:
        for worker_id, capacity in workers:
            backend.workers.append(start_worker(root, server.address, worker_id, capacity))
        yield backend
    finally:
        for worker in backend.workers:
            if worker.process.poll() is None:
                stop_process(worker.process)
        server.stop()


@pytest.fixture(scope="session")
def convsvc_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    with convsvc_backend(tmp_path_factory.mktemp("convsvc-api")) as backend:
        yield backend


@pytest.fixture(params=["stock", "convsvc"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The client suite's backend: a stock agent-server, then convsvc."""
    fixture = "stock" if request.param == "stock" else "convsvc_api"
    found: Backend = request.getfixturevalue(fixture)
    return found


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/alive", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Recorder:
    """A conversation callback that keeps every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = threading.Condition()
        self.synced: Callable[[], list[Any]] = list
        """The conversation's events as its client knows them (REST sync included): what
        happened before the socket subscribed is there, not in ``events``."""

    def __call__(self, event: Any) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_until(self, holds: Callable[[], bool], what: str, timeout: float = 60) -> None:
        """Waits until ``holds()`` is true, checking again at every event."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not holds():
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [type(e).__name__ for e in self.events]
                    raise AssertionError(f"not {what} within {timeout} s; saw {kinds}")
                self._changed.wait(left)

    def wait_for(self, found: Callable[[Any], bool], what: str, timeout: float = 60) -> Any:
        """The first event (from the start) for which ``found`` holds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in [*self.synced(), *self.events]:
                    if found(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [type(e).__name__ for e in self.events]
                    raise AssertionError(f"no {what} within {timeout} s; saw {kinds}")
                self._changed.wait(left)
