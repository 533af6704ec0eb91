"""An ASGI application served by uvicorn inside convsvc's event loop, on a socket bound here."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import structlog
import uvicorn

log = structlog.get_logger(__name__)


class InLoopServer:
    """Serves ``app`` on ``listen`` (host:port) until stopped."""

    def __init__(self, app: Any, listen: str, name: str) -> None:
        host, _, port = listen.rpartition(":")
        self.name = name
        config = uvicorn.Config(
            app,
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            log_config=None,  # convsvc's structured logging
            access_log=False,
            lifespan="off",
            ws="websockets-sansio",
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> str:
        """Binds and starts serving; returns the bound host:port. Binding here (not in
        uvicorn, which exits the process when it cannot bind) makes a taken port an error
        convsvc reports."""
        config = self._server.config
        self._socket = socket.create_server((config.host, config.port))
        self._socket.setblocking(False)
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._socket])
        self._task = asyncio.create_task(self._server.main_loop(), name=self.name)
        host, port = self._socket.getsockname()[:2]
        address = f"{host}:{port}"
        log.info(f"{self.name}.serving", address=address)
        return address

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        if self._socket is not None:
            self._socket.close()
