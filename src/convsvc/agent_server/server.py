"""Serves the agent-server API on its own address, in convsvc's event loop (uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from convsvc.agent_server.backend import Backend
from convsvc.agent_server.conversations import Conversations
from convsvc.agent_server.routes import Routes
from convsvc.agent_server.sockets import EventSocket

log = structlog.get_logger(__name__)


def build_app(conversations: Conversations, auth_required: bool) -> Starlette:
    routes = Routes(conversations).table()
    socket = EventSocket(conversations, auth_required)
    return Starlette(
        routes=[*routes, WebSocketRoute("/sockets/events/{conversation_id}", socket.handle)]
    )


class AgentServerApi:
    """The API's HTTP server and its way into convsvc (the node's own gRPC address)."""

    def __init__(
        self,
        listen: str,
        grpc_address: str,
        *,
        secret: str | None,
        auth_required: bool,
        max_message_bytes: int,
        start_timeout_seconds: float,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._backend = Backend(grpc_address, max_message_bytes)
        conversations = Conversations(self._backend, secret, start_timeout_seconds)
        config = uvicorn.Config(
            build_app(conversations, auth_required),
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            log_config=None,  # convsvc's structured logging
            access_log=False,
            lifespan="off",
            ws="websockets-sansio",
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Binds and starts serving; returns the bound host:port. Binding here (not in
        uvicorn, which exits the process when it cannot bind) makes a taken port an error
        convsvc reports."""
        config = self._server.config
        self._socket = socket.create_server((config.host, config.port), reuse_port=False)
        self._socket.setblocking(False)
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._socket])
        self._task = asyncio.create_task(self._server.main_loop(), name="agent-server-api")
        host, port = self._socket.getsockname()[:2]
        address = f"{host}:{port}"
        log.info("agent_server.serving", address=address)
        return address

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            await self._server.shutdown(sockets=[self._socket])
            self._socket.close()
        await self._backend.close()
