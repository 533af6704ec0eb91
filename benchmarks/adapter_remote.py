"""The adapter's path, run in an OpenHands venv: RemoteConversationManager.send_to_event_stream
until the relayed ``oh_event`` with the echo is emitted to the connection.

``python -m benchmarks.adapter_remote ADDRESS COUNT`` prints the figures as JSON. The socket.io
server only records what the manager emits: this times the manager and the service, not
socket.io's transport.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import socketio
from openhands.core.config import OpenHandsConfig
from openhands.server.config.server_config import ServerConfig
from openhands.server.monitoring import MonitoringListener
from openhands.storage.data_models.settings import Settings
from openhands.storage.memory import InMemoryFileStore

from benchmarks.stats import latency_summary
from convclient import ClientSettings
from convclient.openhands import RemoteConversationManager

CONNECTION = "bench-connection"


class RecordingServer(socketio.AsyncServer):  # type: ignore[misc]
    """Keeps what the manager emits, with the time it was emitted."""

    def __init__(self) -> None:
        super().__init__(async_mode="asgi")
        self.emitted: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()

    async def emit(self, event: str, data: Any = None, **_: Any) -> None:
        if event == "oh_event":
            self.emitted.put_nowait((time.perf_counter(), data))

    async def enter_room(self, sid: str, room: str, namespace: str | None = None) -> None:
        """No real socket behind the connection: nothing to enter."""


async def echo_emitted(sio: RecordingServer, content: str) -> float:
    while True:
        emitted_at, data = await sio.emitted.get()
        if data.get("source") == "agent" and data.get("message") == content:
            return emitted_at


async def measure(address: str, count: int) -> dict[str, float]:
    sio = RecordingServer()
    manager = RemoteConversationManager(
        sio,
        OpenHandsConfig(),
        InMemoryFileStore(),
        ServerConfig(),
        MonitoringListener(),
        client_settings=ClientSettings(address=address),
    )
    async with manager:
        cid = "adapter-bench"
        await manager.maybe_start_agent_loop(cid, Settings(), None)
        await manager.join_conversation(cid, CONNECTION, Settings(), None)
        latencies: list[float] = []
        began = time.perf_counter()
        for n in range(count + 20):
            content = f"adapter-{n}"
            sent_at = time.perf_counter()
            await manager.send_to_event_stream(
                CONNECTION, {"action": "message", "args": {"content": content}}
            )
            emitted_at = await asyncio.wait_for(echo_emitted(sio, content), 30)
            if n == 19:
                began = time.perf_counter()
            if n >= 20:  # the first ones warm up
                latencies.append(emitted_at - sent_at)
        elapsed = time.perf_counter() - began
    return {"messages_per_s": count / elapsed, **latency_summary(latencies)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(sys.argv[1], int(sys.argv[2])))))
