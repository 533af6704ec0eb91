"""The convsvc process: store, engine and gRPC server, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog
from prometheus_client import start_http_server

from convsvc.agents import available_agents
from convsvc.config import Settings
from convsvc.engine import ConversationEngine
from convsvc.storage.sqlite import SqliteStore
from convsvc.transport.server import GrpcServer
from convsvc.workers import AgentCatalog, WorkerPool

log = structlog.get_logger(__name__)


class ConvsvcApp:
    """Everything one ``convsvc serve`` runs; usable in-process by tests and benchmarks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        storage = settings.storage
        self.store = SqliteStore(
            storage.sqlite_path,
            synchronous=storage.sqlite_synchronous,
            group_commit=storage.group_commit,
        )
        in_process = available_agents()
        self.workers = WorkerPool(
            settings.workers, in_process, max_event_bytes=settings.engine.max_batch_bytes
        )
        self.engine = ConversationEngine(
            settings.engine, self.store, AgentCatalog(in_process, self.workers)
        )
        self.server: GrpcServer | None = None
        self._metrics: Any = None

    async def start(self) -> str:
        """Opens the store, starts the engine and serves; returns the bound host:port."""
        await self.store.open()
        await self.engine.start()
        self.workers.start()
        self.server = GrpcServer(
            self.engine,
            self.settings.listen,
            worker_pool=self.workers,
            auth_token=self.settings.resolved_auth_token(),
            tls=self.settings.tls,
            max_message_bytes=self.settings.max_message_bytes,
        )
        await self.server.start()
        if self.settings.metrics_listen:
            host, port = self.settings.metrics_listen.rsplit(":", 1)
            self._metrics, _ = start_http_server(int(port), addr=host)
        address = self.server.address
        if self.settings.ready_file is not None:
            tmp = self.settings.ready_file.with_suffix(".tmp")
            tmp.write_text(address)
            tmp.replace(self.settings.ready_file)  # readers never see a half-written file
        log.info("server.serving", address=address, data_dir=str(self.settings.data_dir))
        return address

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, streams end (clients resume elsewhere), calls in
        flight finish, loops close, the store flushes."""
        log.info("server.stopping")
        if self.server is not None:
            await self.server.enter_shutdown()
            self.engine.end_streams()
            if not await self.server.drain(self.settings.shutdown_grace_seconds):
                log.warning("server.grace_exceeded", grace=self.settings.shutdown_grace_seconds)
            # Nothing is in flight any more (or the grace is over): stop listening at once.
            await self.server.stop(0)
        await self.engine.stop()
        await self.workers.stop()
        await self.store.close()
        if self._metrics is not None:
            self._metrics.shutdown()
        log.info("server.stopped")


async def run(settings: Settings) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully."""
    app = ConvsvcApp(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()
