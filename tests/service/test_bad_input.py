"""Bad requests get a precise status, a readable message and a stable ErrorInfo reason."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import agent_state_is, error_info, expect_error, grpc_events_until

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


# -- requests that do not parse (issue 8, item 5) -------------------------------------------


def nested_struct_bytes(depth: int) -> bytes:
    """A Struct nested ``depth`` levels deep, encoded by hand (protobuf would refuse to build
    one past its recursion limit)."""

    def length_delimited(field: int, payload: bytes) -> bytes:
        return bytes([field << 3 | 2]) + _varint(len(payload)) + payload

    struct = b""
    for _ in range(depth):
        value = length_delimited(5, struct)  # Value.struct_value
        entry = length_delimited(1, b"k") + length_delimited(2, value)  # map key, value
        struct = length_delimited(1, entry)  # Struct.fields
    return struct


EVERY_KIND = ("GetConversation", "StartConversation", "StreamEvents")


def malformed_requests() -> list[tuple[str, bytes, tuple[str, ...]]]:
    deep = nested_struct_bytes(150)
    deep_settings = b"\x22" + _varint(len(deep)) + deep  # StartConversationRequest.settings
    return [
        ("not protobuf", b"\xff", EVERY_KIND),
        ("truncated", b"\x0a\x10abc", EVERY_KIND),
        ("invalid utf-8", b"\x0a\x02\xc3\x28", EVERY_KIND),
        ("nested past the limit", deep_settings, ("StartConversation",)),
    ]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@pytest.mark.parametrize(("label", "data", "methods"), malformed_requests())
async def test_requests_that_do_not_parse_are_invalid_arguments(
    app, label: str, data: bytes, methods: tuple[str, ...]
) -> None:
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        for method in methods:
            path = f"/convsvc.v1.ConversationService/{method}"
            if method == "StreamEvents":
                call: Any = channel.unary_stream(path)(data)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in call:
                        pass
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary(path)(data)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, method)
            info = error_info(caught.value)
            assert info.reason == "MALFORMED_REQUEST"
            assert "Traceback" not in (caught.value.details() or "")


# -- page tokens (issue 8, item 6) --------------------------------------------------------------


def forged(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        forged('{"q": "0123456789abcdef", "p": null}'),
        forged('{"q": "0123456789abcdef", "p": 1e400}'),
        forged("[" * 50_000),
        "A" * 100_000,
        forged("x" * 16 + '{"q":"x","p":-1}'),
    ],
    ids=["null position", "overflowing position", "deep nesting", "huge", "bad mac"],
)
async def test_forged_page_tokens_are_refused(running, token: str) -> None:
    for call in (
        running.SearchEvents(pb.SearchEventsRequest(conversation_id="c1", page_token=token)),
        running.ListConversations(pb.ListConversationsRequest(page_token=token)),
        running.ListConnections(pb.ListConnectionsRequest(page_token=token)),
    ):
        await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_a_token_survives_a_restart_of_the_same_store(tmp_path) -> None:
    async with (
        running_app(tmp_path / "data") as app,
        grpc.aio.insecure_channel(app.server.address) as channel,
    ):
        stub = pb_grpc.ConversationServiceStub(channel)
        await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
        await grpc_events_until(stub, "c1", agent_state_is("awaiting_user_input"))
        page = await stub.SearchEvents(pb.SearchEventsRequest(conversation_id="c1", page_size=1))
    assert page.next_page_token
    async with (
        running_app(tmp_path / "data") as app,
        grpc.aio.insecure_channel(app.server.address) as channel,
    ):
        stub = pb_grpc.ConversationServiceStub(channel)
        after = await stub.SearchEvents(
            pb.SearchEventsRequest(
                conversation_id="c1", page_size=1, page_token=page.next_page_token
            )
        )
    assert [e.id for e in after.events] == [1]


# -- replay_events (issue 8, item 7) ------------------------------------------------------------


async def test_each_replayed_event_has_the_event_size_limit(stub) -> None:
    big = {"source": "user", "action": "note", "args": {"text": "x" * (1024 * 1024 + 1)}}
    await expect_error(
        stub.StartConversation(
            pb.StartConversationRequest(conversation_id="r", replay_events=[struct(big)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAYLOAD_TOO_LARGE",
    )


async def test_replay_events_are_limited_in_number(stub) -> None:
    note = struct({"source": "user", "action": "note"})
    details = await expect_error(
        stub.StartConversation(
            pb.StartConversationRequest(conversation_id="r", replay_events=[note] * 1001)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOO_MANY_REPLAY_EVENTS",
    )
    assert "1000" in details
    await expect_error(
        stub.GetConversation(pb.GetConversationRequest(conversation_id="r")),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )  # nothing was started


# -- strings echoed into errors (issue 8, item 9) ---------------------------------------------


async def test_a_huge_agent_name_gets_a_short_error(stub) -> None:
    details = await expect_error(
        stub.StartConversation(pb.StartConversationRequest(agent="a" * 10_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_AGENT",
    )
    assert len(details) < 300


@pytest.mark.parametrize("position", ["null", "1e400", '"x"', "-5", "true"])
async def test_tokens_forged_with_the_right_query_digest_are_refused(
    running, position: str
) -> None:
    """The attack of issue 8, item 6: the digest of the query is public knowledge."""
    query = json.dumps(["events", "c1", 0, None, False], sort_keys=True).encode()
    digest = hashlib.sha256(query).hexdigest()[:16]
    token = forged(f'{{"q": "{digest}", "p": {position}}}')
    await expect_error(
        running.SearchEvents(pb.SearchEventsRequest(conversation_id="c1", page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
