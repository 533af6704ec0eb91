"""The agent-server API's application: its routes and its events WebSocket."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from convsvc.agent_server.conversations import Conversations
from convsvc.agent_server.routes import Routes
from convsvc.agent_server.sockets import EventSocket
from convsvc.web.loopback import Backend


def build_app(
    backend: Backend, *, secret: str | None, auth_required: bool, start_timeout_seconds: float
) -> Starlette:
    conversations = Conversations(backend, secret, start_timeout_seconds)
    routes = Routes(conversations).table()
    socket = EventSocket(conversations, auth_required)
    return Starlette(
        routes=[*routes, WebSocketRoute("/sockets/events/{conversation_id}", socket.handle)]
    )
