"""Operators can scrape Prometheus metrics of the RPCs served."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request
from pathlib import Path

import grpc

from convsvc.app import ConvsvcApp
from convsvc.config import Settings
from convsvc.metrics import EngineGauges
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_rpc_counts_are_exposed(tmp_path: Path) -> None:
    port = free_port()
    async with running_app(tmp_path / "data", metrics_listen=f"127.0.0.1:{port}") as app:
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            await stub.StartConversation(pb.StartConversationRequest(conversation_id="m1"))
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode()
        )
    assert 'convsvc_rpc_calls_total{code="OK",method="StartConversation"}' in body


async def test_the_node_s_state_is_read_on_its_event_loop_not_the_scraping_thread(
    tmp_path: Path,
) -> None:
    # The HTTP server scrapes on a thread of its own; reading the engine's dictionaries
    # there raced their changes ("dictionary changed size during iteration": HTTP 500).
    port = free_port()
    app = ConvsvcApp(
        Settings(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "data",
            use_uvloop=False,
            metrics_listen=f"127.0.0.1:{port}",
        )
    )
    readers: list[int] = []
    gauges = app.engine.queries.gauges

    def recording() -> EngineGauges:
        readers.append(threading.get_ident())
        return gauges()

    app.engine.queries.gauges = recording  # type: ignore[method-assign]
    await app.start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode()
        )
    finally:
        await app.stop()
    assert "convsvc_conversations" in body
    assert readers == [threading.get_ident()]
