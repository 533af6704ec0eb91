"""Operators can scrape Prometheus metrics of the RPCs served."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import grpc

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
