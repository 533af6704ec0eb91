"""Shared fixtures: a real engine on a real SQLite file, a real grpc.aio server on loopback,
and `convsvc serve` as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from convsvc.agents import available_agents
from convsvc.app import ConvsvcApp
from convsvc.config import EngineConfig, Settings
from convsvc.engine import ConversationEngine
from convsvc.storage.sqlite import SqliteStore
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.otlp import Collector, otlp_collector
from tests.postgres import PostgresServer, postgres_server

CONVSVC_BIN = Path(sys.executable).parent / "convsvc"


class FakeClock:
    """A monotonic clock the test moves by hand, so idle rules are tested without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class EngineHarness:
    engine: ConversationEngine
    store: SqliteStore
    clock: FakeClock
    path: Path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_engine(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Callable[..., Any]]:
    """Builds engines on SQLite files under tmp_path; all are stopped at teardown."""
    harnesses: list[EngineHarness] = []

    async def build(
        *, agents: dict[str, Any] | None = None, path: Path | None = None, **config: Any
    ) -> EngineHarness:
        db = path or tmp_path / f"engine{len(harnesses)}.sqlite3"
        store = SqliteStore(db)
        await store.open()
        engine = ConversationEngine(
            EngineConfig(**config), store, agents or available_agents(), clock=clock
        )
        harness = EngineHarness(engine, store, clock, db)
        harnesses.append(harness)
        return harness

    yield build
    for harness in harnesses:
        await harness.engine.stop()
        await harness.store.close()


@pytest.fixture
async def engine(make_engine: Callable[..., Any]) -> EngineHarness:
    harness: EngineHarness = await make_engine()
    return harness


@asynccontextmanager
async def running_app(data_dir: Path, **settings: Any) -> AsyncIterator[ConvsvcApp]:
    """A ConvsvcApp serving on 127.0.0.1:0 in this process."""
    app = ConvsvcApp(
        Settings(**{"listen": "127.0.0.1:0", "data_dir": data_dir, "use_uvloop": False, **settings})
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[ConvsvcApp]:
    async with running_app(tmp_path / "data") as started:
        yield started


@pytest.fixture
async def stub(app: ConvsvcApp) -> AsyncIterator[pb_grpc.ConversationServiceStub]:
    assert app.server is not None
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        yield pb_grpc.ConversationServiceStub(channel)


@dataclass
class ServerProcess:
    """`convsvc serve` running as its own process."""

    data_dir: Path
    env: dict[str, str]
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    log_path: Path | None = None
    listen: str = "127.0.0.1:0"
    wrapper: list[str] = field(default_factory=list)
    """Runs the server under another command (the partition tests: a network namespace)."""

    def start(self, timeout: float = 30.0) -> str:
        ready = self.data_dir.parent / f"ready-{os.getpid()}-{time.monotonic_ns()}"
        self.log_path = self.data_dir.parent / "server.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                *self.wrapper,
                str(CONVSVC_BIN),
                "serve",
                "--listen",
                self.listen,
                "--data-dir",
                str(self.data_dir),
                "--ready-file",
                str(ready),
                *self.extra_args,
            ],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"convsvc exited early:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"convsvc not ready in {timeout}s:\n{self.log_path.read_text()}")
            time.sleep(0.05)  # polling a file another process writes; no event to wait on
        self.address = ready.read_text().strip()
        return self.address

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory for `convsvc serve` processes sharing one data dir; killed at teardown."""
    processes: list[ServerProcess] = []

    def make(
        extra_env: dict[str, str] | None = None, extra_args: list[str] | None = None
    ) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
        env.update({"CONVSVC_LOG_LEVEL": "INFO", **(extra_env or {})})
        proc = ServerProcess(tmp_path / "data", env, extra_args or [])
        processes.append(proc)
        return proc

    yield make
    for proc in processes:
        if proc.process is not None and proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait(10)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres: PostgresServer) -> str:
    """A database of this test's own on the session's server."""
    return postgres.create_database()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    """A real OTLP trace receiver on loopback, and its port."""
    async with otlp_collector() as started:
        yield started
