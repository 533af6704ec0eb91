"""Bad requests get a precise status, a readable message and a stable ErrorInfo reason."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from convsvc.v1 import conversation_service_pb2 as pb
from tests.helpers import error_info, expect_error

HI = {"action": "message", "args": {"content": "hi"}}


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


@pytest.fixture
async def running(stub) -> Any:
    await stub.JoinConversation(
        pb.JoinConversationRequest(conversation_id="c1", connection_id="s1", user_id="alice")
    )
    return stub


@pytest.mark.parametrize(
    "bad_id", ["", "has space", "slash/inside", "x" * 129, "semi;colon", "ünïcode"]
)
async def test_malformed_conversation_ids(stub, bad_id: str) -> None:
    details = await expect_error(
        stub.GetConversation(pb.GetConversationRequest(conversation_id=bad_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ID",
    )
    assert "conversation_id" in details and "1 to 128 characters" in details


async def test_malformed_user_id(stub) -> None:
    await expect_error(
        stub.StartConversation(pb.StartConversationRequest(user_id="a b")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ID",
    )


async def test_event_missing(running) -> None:
    await expect_error(
        running.SendEvent(pb.SendEventRequest(connection_id="s1", user_id="alice")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_EVENT",
    )


@pytest.mark.parametrize(
    "event", [{"args": {"content": "hi"}}, {"action": ""}, {"action": 3}, {"action": ["message"]}]
)
async def test_event_without_a_string_action(running, event: dict[str, Any]) -> None:
    details = await expect_error(
        running.SendEvent(
            pb.SendEventRequest(connection_id="s1", user_id="alice", event=struct(event))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_EVENT",
    )
    assert '"action"' in details


async def test_oversized_event(running) -> None:
    big = {"action": "message", "args": {"content": "x" * (1024 * 1024 + 1)}}
    details = await expect_error(
        running.SendEvent(
            pb.SendEventRequest(connection_id="s1", user_id="alice", event=struct(big))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAYLOAD_TOO_LARGE",
    )
    assert "limit" in details


async def test_message_over_the_transport_limit_is_refused_by_grpc(running) -> None:
    huge = {"action": "message", "args": {"content": "x" * (5 * 1024 * 1024)}}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.SendEvent(
            pb.SendEventRequest(connection_id="s1", user_id="alice", event=struct(huge))
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_unknown_conversation(stub) -> None:
    details = await expect_error(
        stub.GetConversation(pb.GetConversationRequest(conversation_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    assert "nope" in details


async def test_unknown_connection(stub) -> None:
    await expect_error(
        stub.SendEvent(pb.SendEventRequest(connection_id="ghost", event=struct(HI))),
        grpc.StatusCode.NOT_FOUND,
        "CONNECTION_NOT_FOUND",
    )


async def test_send_without_a_target(stub) -> None:
    await expect_error(
        stub.SendEvent(pb.SendEventRequest(event=struct(HI))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_unknown_agent(stub) -> None:
    details = await expect_error(
        stub.StartConversation(pb.StartConversationRequest(agent="nonesuch")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_AGENT",
    )
    assert "echo" in details  # names what is available


async def test_negative_page_size(stub) -> None:
    await expect_error(
        stub.ListConversations(pb.ListConversationsRequest(page_size=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_SIZE",
    )


@pytest.mark.parametrize("token", ["garbage!", "eyJ4IjoxfQ", "e30"])
async def test_bad_page_token(running, token: str) -> None:
    await expect_error(
        running.ListConversations(pb.ListConversationsRequest(page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_page_token_of_another_query(running) -> None:
    for n in range(3):
        await running.StartConversation(pb.StartConversationRequest(conversation_id=f"p{n}"))
    page = await running.ListConversations(pb.ListConversationsRequest(page_size=1))
    assert page.next_page_token
    await expect_error(
        running.ListConversations(
            pb.ListConversationsRequest(
                page_size=1, user_id="alice", page_token=page.next_page_token
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_negative_stream_start(running) -> None:
    call = running.StreamEvents(pb.StreamEventsRequest(conversation_id="c1", start_id=-1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"


async def test_stream_of_unknown_conversation(stub) -> None:
    call = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "CONVERSATION_NOT_FOUND"


async def test_search_end_below_start(running) -> None:
    await expect_error(
        running.SearchEvents(pb.SearchEventsRequest(conversation_id="c1", start_id=5, end_id=2)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_request_id_reused_for_another_request(running) -> None:
    await running.SendEvent(
        pb.SendEventRequest(connection_id="s1", event=struct(HI), request_id="r1")
    )
    await expect_error(
        running.SendEvent(
            pb.SendEventRequest(
                connection_id="s1",
                event=struct({"action": "message", "args": {"content": "other"}}),
                request_id="r1",
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_CONFLICT",
    )
