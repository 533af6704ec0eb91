"""Clients that never read cost the server what their buffers allow, and no more.

Six Connect clients and six StreamEvents clients open on one conversation, read their first
answer, then read nothing while megabytes of events flow. The server's resident memory may
grow by what their queues are bounded by (the subscriber buffer, Connect's outbox, what gRPC
holds per stream), not by everything they did not read; then each is dropped with
SUBSCRIBER_TOO_SLOW and may resume by id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from convclient.structs import dict_to_struct
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.helpers import error_info

MIB = 1024 * 1024
SUBSCRIBER_BUFFER = 4 * MIB
CLIENTS = 6
SENDS = 60
CONTENT = "x" * (MIB // 2 - 1024)
"""Each send logs it twice (message and content), and the echo twice more."""
ALLOWED_GROWTH = 250 * MIB
"""Within the bounds (buffers, outboxes, gRPC's windows, SQLite's cache) with room to spare;
an unbounded outbox holds several hundred megabytes here."""


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def read_to_the_end(call: Any) -> grpc.aio.AioRpcError:
    async with asyncio.timeout(60):
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError("the stream ended without an error")


async def test_clients_that_never_read_cost_what_their_buffers_allow(
    server_process: Callable[..., Any], tally
) -> None:
    server = server_process({"CONVSVC_ENGINE__SUBSCRIBER_BUFFER_BYTES": str(SUBSCRIBER_BUFFER)})
    address = server.start()
    assert server.process is not None
    options = [("grpc.max_receive_message_length", 8 * MIB)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await stub.StartConversation(pb.StartConversationRequest(conversation_id="m"))
        idle: list[Any] = []
        for n in range(CLIENTS):
            connect = stub.Connect()
            await connect.write(
                pb.ConnectRequest(
                    open=pb.ConnectOpen(conversation_id="m", connection_id=f"idle-{n}")
                )
            )
            assert (await connect.read()).HasField("opened")
            idle.append(connect)
            stream = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="m"))
            await stream.read()
            idle.append(stream)
        # One client that keeps up tells when every event has been committed and published.
        target: list[int] = []
        seen = [-1]
        done = asyncio.Event()

        async def follow() -> None:
            # Under load even this one may fall behind the small buffer: it resumes by id,
            # as clients do.
            while True:
                follower = stub.StreamEvents(
                    pb.StreamEventsRequest(conversation_id="m", start_id=seen[0] + 1)
                )
                try:
                    async for response in follower:
                        seen[0] = max([seen[0], *(event.id for event in response.events)])
                        if target and seen[0] >= target[0]:
                            done.set()
                except grpc.aio.AioRpcError as exc:
                    if error_info(exc).reason != "SUBSCRIBER_TOO_SLOW":
                        raise

        following = asyncio.create_task(follow())
        before = resident_bytes(server.process.pid)

        message = dict_to_struct({"action": "message", "args": {"content": CONTENT}})
        last = 0
        for _ in range(SENDS):
            sent = await stub.SendEvent(
                pb.SendEventRequest(conversation_id="m", event=message), timeout=30
            )
            last = sent.event_id
        target.append(last + 3)  # the echo of the last message, and awaiting_user_input
        if seen[0] >= target[0]:  # the follower may have seen it all before the answer came
            done.set()
        await asyncio.wait_for(done.wait(), 120)
        grown = resident_bytes(server.process.pid) - before
        tally.checked("memory: clients that never read stay within their buffers")
        assert grown < ALLOWED_GROWTH, f"the server grew by {grown / MIB:.0f} MiB"

        for call in idle:
            error = await read_to_the_end(call)
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(error).reason == "SUBSCRIBER_TOO_SLOW"
            assert "resume_start_id" in error_info(error).metadata or "Connect" in str(call)
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
