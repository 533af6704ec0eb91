"""A browser as OpenHands' frontend is one: a socket.io client on a conversation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import socketio

from tests.openhands.conftest import OpenHandsServer

EVENT_TIMEOUT = 30.0


class Browser:
    """A socket.io client connected to one conversation, recording its oh_event messages."""

    def __init__(self, server: OpenHandsServer) -> None:
        self._server = server
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.sio = self._client()

    def _client(self) -> socketio.AsyncClient:
        sio = socketio.AsyncClient(reconnection=False)

        @sio.on("oh_event")
        async def on_event(data: dict[str, Any]) -> None:
            self.events.append(data)
            self._changed.set()

        return sio

    async def connect(self, conversation_id: str, latest_event_id: int = -1) -> None:
        url = f"{self._server.url}?conversation_id={conversation_id}"
        url += f"&latest_event_id={latest_event_id}"
        try:
            await self.sio.connect(url, transports=["websocket"], wait_timeout=EVENT_TIMEOUT)
        except socketio.exceptions.ConnectionError as exc:
            # Seen rarely with OpenHands 0.62 behind a Redis manager: the websocket closes
            # right after the server accepted the join, before the client saw the namespace.
            # OpenHands' frontend reconnects; so does this browser, once, if it has received
            # nothing yet (the new connection's replay then starts from the same point).
            if "Unexpected connection error" not in str(exc) or self.events:
                raise
            self.sio = self._client()
            await self.sio.connect(url, transports=["websocket"], wait_timeout=EVENT_TIMEOUT)

    async def until(self, done: Callable[[list[dict[str, Any]]], bool]) -> None:
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not done(self.events):
                self._changed.clear()
                await self._changed.wait()

    async def say(self, content: str) -> None:
        await self.sio.emit("oh_user_action", {"action": "message", "args": {"content": content}})

    def ids(self) -> list[int]:
        return [e["id"] for e in self.events if "id" in e and not e.get("status_update")]

    async def close(self) -> None:
        await self.sio.disconnect()
