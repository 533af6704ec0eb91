"""Agent workers for the tests: convsvc in this process, and workers either as real
``convworker`` processes or as a scripted protocol client (for workers that misbehave)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from convsvc.app import ConvsvcApp
from convsvc.config import WorkersConfig
from convsvc.v1 import agent_worker_service_pb2 as wpb
from convsvc.v1 import agent_worker_service_pb2_grpc as wpb_grpc
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app

FAST_LIVENESS = WorkersConfig(
    kinds=("worker-echo",),
    ping_interval_seconds=0.2,
    silence_timeout_seconds=1.0,
    stop_timeout_seconds=5.0,
)


@pytest.fixture
async def worker_app(tmp_path: Path) -> AsyncIterator[ConvsvcApp]:
    async with running_app(tmp_path / "data", workers=FAST_LIVENESS) as app:
        yield app


@pytest.fixture
async def stub(worker_app: ConvsvcApp) -> AsyncIterator[pb_grpc.ConversationServiceStub]:
    assert worker_app.server is not None
    async with grpc.aio.insecure_channel(worker_app.server.address) as channel:
        yield pb_grpc.ConversationServiceStub(channel)


async def attached(app: ConvsvcApp, worker_id: str, timeout: float = 30.0) -> None:
    await app.workers.wait_until(
        lambda: any(w.worker_id == worker_id for w in app.workers.workers()), timeout
    )


def children_of(pid: int) -> list[int]:
    """Direct children of a process (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command may hold spaces and parentheses: the fields follow the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class WorkerProcess:
    """A real ``convworker`` process."""

    worker_id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def conversation_pids(self) -> list[int]:
        """Processes forked by its zygote, one per running conversation."""
        return [pid for zygote in children_of(self.process.pid) for pid in children_of(zygote)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(
        address: str, worker_id: str, *, kinds: tuple[str, ...] = ("worker-echo",), **env: str
    ) -> WorkerProcess:
        log_path = tmp_path / f"{worker_id}.log"
        arguments = [sys.executable, "-m", "convworker", "--address", address]
        arguments += ["--worker-id", worker_id, "--workspace-root", str(tmp_path / "work")]
        for kind in kinds:
            arguments += ["--kind", kind]
        base = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                arguments, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(worker_id, process, log_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
            try:
                worker.process.wait(15)
            except subprocess.TimeoutExpired:
                worker.process.kill()


@dataclass
class ScriptedWorker:
    """A worker whose every message the test writes: for protocol violations."""

    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...] = ()
    pings: bool = True
    """Whether it pings like a live worker (every 0.1 s, well within the tests' liveness)."""
    _out: asyncio.Queue[wpb.AttachRequest | None] = field(default_factory=asyncio.Queue)
    call: Any = None
    _pinger: asyncio.Task[None] | None = None

    def open(self, *first: wpb.AttachRequest) -> None:
        for message in first:
            self._out.put_nowait(message)
        if self.pings:
            self._pinger = asyncio.create_task(self._ping())

        async def requests() -> AsyncIterator[wpb.AttachRequest]:
            while (message := await self._out.get()) is not None:
                yield message

        self.call = wpb_grpc.AgentWorkerServiceStub(self.channel).Attach(
            requests(), metadata=self.metadata
        )

    def send(self, message: wpb.AttachRequest) -> None:
        self._out.put_nowait(message)

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(0.1)  # liveness is time-based by design
            self._out.put_nowait(wpb.AttachRequest(ping=wpb.WorkerPing()))

    def hello(self, worker_id: str, kinds: tuple[str, ...] = ("worker-echo",)) -> None:
        self.open(
            wpb.AttachRequest(
                hello=wpb.WorkerHello(worker_id=worker_id, agent_kinds=kinds, capacity=4)
            )
        )

    async def receive(self, kind: str, timeout: float = 10.0) -> Any:
        """The next message of ``kind`` (pings and others in between are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    raise AssertionError(f"the stream ended before a {kind}")
                if response.WhichOneof("message") == kind:
                    return getattr(response, kind)

    async def ended_with(self, timeout: float = 10.0) -> grpc.aio.AioRpcError:
        """The status the server ended the stream with."""
        async with asyncio.timeout(timeout):
            try:
                while await self.call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc
        raise AssertionError("the stream ended without an error")

    def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        self._out.put_nowait(None)
        if self.call is not None:
            self.call.cancel()


@pytest.fixture
async def scripted(
    worker_app: ConvsvcApp,
) -> AsyncIterator[Callable[..., ScriptedWorker]]:
    assert worker_app.server is not None
    made: list[ScriptedWorker] = []
    async with grpc.aio.insecure_channel(worker_app.server.address) as channel:

        def make(metadata: tuple[tuple[str, str], ...] = (), pings: bool = True) -> ScriptedWorker:
            worker = ScriptedWorker(channel, metadata, pings)
            made.append(worker)
            return worker

        yield make
        for worker in made:
            worker.close()
