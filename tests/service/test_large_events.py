"""Every stored event can always be read: responses are bounded by bytes, not only by count
(issue 8, item 3). Before, a page of five 900 KB events, or a stream batch of a thousand
4.5 KB events, exceeded gRPC's message limit and failed for good."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import agent_state_is, error_info, grpc_events_until


def note(size: int, n: int) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"action": "note", "args": {"n": n, "text": "x" * size}})
    return s


async def send_notes(stub: pb_grpc.ConversationServiceStub, count: int, size: int) -> None:
    for n in range(count):
        await stub.SendEvent(pb.SendEventRequest(conversation_id="big", event=note(size, n)))


async def read_everything(stub: pb_grpc.ConversationServiceStub, last_id: int) -> list[int]:
    """Every id, by search pages with default sizes and by a stream from 0."""
    searched: list[int] = []
    token = ""
    while True:
        page = await stub.SearchEvents(
            pb.SearchEventsRequest(conversation_id="big", page_token=token)
        )
        searched.extend(e.id for e in page.events)
        token = page.next_page_token
        if not token:
            break
    streamed = await grpc_events_until(
        stub, "big", lambda seen: bool(seen) and seen[-1].get("id") == last_id, timeout=30
    )
    assert [p["id"] for p in streamed] == searched
    return searched


async def started(stub: pb_grpc.ConversationServiceStub) -> int:
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="big"))
    await grpc_events_until(stub, "big", agent_state_is("awaiting_user_input"))
    return 2  # loading, awaiting_user_input


async def test_events_near_the_size_limit_can_all_be_read(stub) -> None:
    first = await started(stub)
    await send_notes(stub, 5, 900 * 1024)
    assert await read_everything(stub, first + 4) == list(range(first + 5))


async def test_a_thousand_mid_sized_events_stream_from_the_start(stub) -> None:
    first = await started(stub)
    await send_notes(stub, 1050, 4500)
    assert await read_everything(stub, first + 1049) == list(range(first + 1050))


async def test_a_stalled_subscriber_is_dropped_clearly_and_resumes(tmp_path: Path) -> None:
    async with running_app(
        tmp_path / "data", engine={"subscriber_buffer_bytes": 1024 * 1024}
    ) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            first = await started(stub)
            stalled: Any = stub.StreamEvents(
                pb.StreamEventsRequest(conversation_id="big", start_id=first)
            )
            await send_notes(stub, 1, 10)
            received = [e.id for e in (await stalled.read()).events]  # subscribed: now stall
            await send_notes(stub, 200, 64 * 1024)  # 12.5 MiB: past the buffer and the window
            error: grpc.aio.AioRpcError | None = None
            try:
                while (response := await stalled.read()) is not grpc.aio.EOF:
                    received.extend(e.id for e in response.events)
            except grpc.aio.AioRpcError as exc:
                error = exc
            assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(error)
            assert info.reason == "SUBSCRIBER_TOO_SLOW"
            resume = int(info.metadata["resume_start_id"])
            assert resume == (received[-1] + 1 if received else first)
            rest = await grpc_events_until(
                stub,
                "big",
                lambda seen: bool(seen) and seen[-1].get("id") == first + 200,
                start_id=resume,
                timeout=30,
            )
            assert received + [p["id"] for p in rest] == list(range(first, first + 201))
