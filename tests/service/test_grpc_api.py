"""The API over a real grpc.aio server: lifecycle, lists with pages, search, stream."""

from __future__ import annotations

import contextlib
import sqlite3

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convclient.structs import struct_to_dict
from convsvc.config import EngineConfig
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import agent_state_is, echo_of, error_info, grpc_events_until, ids


def message(text: str) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"action": "message", "args": {"content": text}})
    return s


async def test_echo_round_trip_through_the_stream(stub) -> None:
    joined = await stub.JoinConversation(
        pb.JoinConversationRequest(conversation_id="c1", connection_id="s1", user_id="alice")
    )
    assert joined.connection.conversation_id == "c1"
    sent = await stub.SendEvent(
        pb.SendEventRequest(connection_id="s1", user_id="alice", event=message("hi"))
    )
    payloads = await grpc_events_until(stub, "c1", echo_of("hi"), user_id="alice")
    assert ids(payloads) == list(range(len(payloads)))
    user = next(p for p in payloads if p["id"] == sent.event_id)
    assert user == {
        "id": sent.event_id,
        "timestamp": user["timestamp"],
        "source": "user",
        "message": "hi",
        "action": "message",
        "args": {"content": "hi"},
    }
    assert isinstance(user["id"], int)  # integral doubles come back as ints


async def test_stream_batches_and_typed_envelope(stub) -> None:
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
    for n in range(20):
        await stub.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message(f"m{n}")))
    await grpc_events_until(stub, "c1", echo_of("m19"))
    call = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="c1", max_batch_size=25))
    first = await call.read()
    call.cancel()
    assert len(first.events) == 25  # stored events arrive in full batches
    assert [e.id for e in first.events] == list(range(25))
    event = first.events[0]
    assert event.conversation_id == "c1"
    assert event.kind == pb.EVENT_KIND_OBSERVATION
    assert event.name == "agent_state_changed"
    assert event.source == "environment"
    assert event.timestamp.seconds > 0


async def test_lists_filter_and_page(stub) -> None:
    for n in range(5):
        await stub.JoinConversation(
            pb.JoinConversationRequest(
                conversation_id=f"c{n}", connection_id=f"s{n}", user_id="u1" if n < 3 else "u2"
            )
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListConversations(
            pb.ListConversationsRequest(user_id="u1", page_size=2, page_token=token)
        )
        seen.extend(c.conversation_id for c in page.conversations)
        assert all(
            c.status == pb.CONVERSATION_STATUS_RUNNING
            or c.status == pb.CONVERSATION_STATUS_STARTING
            for c in page.conversations
        )
        token = page.next_page_token
        if not token:
            break
    assert seen == ["c0", "c1", "c2"]
    by_ids = await stub.ListConversations(
        pb.ListConversationsRequest(conversation_ids=["c4", "c0"])
    )
    assert [c.conversation_id for c in by_ids.conversations] == ["c0", "c4"]
    connections = await stub.ListConnections(pb.ListConnectionsRequest(user_id="u2"))
    assert [c.connection_id for c in connections.connections] == ["s3", "s4"]


async def test_search_events_by_range_reverse_and_pages(stub) -> None:
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
    await stub.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message("x")))
    await grpc_events_until(stub, "c1", echo_of("x"))
    ranged = await stub.SearchEvents(
        pb.SearchEventsRequest(conversation_id="c1", start_id=1, end_id=3)
    )
    assert [e.id for e in ranged.events] == [1, 2, 3]
    backwards: list[int] = []
    token = ""
    while True:
        page = await stub.SearchEvents(
            pb.SearchEventsRequest(
                conversation_id="c1", reverse=True, page_size=2, page_token=token
            )
        )
        backwards.extend(e.id for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert backwards == sorted(backwards, reverse=True)
    assert backwards[-1] == 0


async def test_close_then_get_reports_stopped(stub) -> None:
    await stub.JoinConversation(
        pb.JoinConversationRequest(conversation_id="c1", connection_id="s1")
    )
    closed = await stub.CloseConversation(pb.CloseConversationRequest(conversation_id="c1"))
    assert closed.conversation.status == pb.CONVERSATION_STATUS_STOPPED
    got = await stub.GetConversation(pb.GetConversationRequest(conversation_id="c1"))
    assert got.conversation.status == pb.CONVERSATION_STATUS_STOPPED
    assert got.conversation.agent_state == "stopped"
    assert (await stub.ListConnections(pb.ListConnectionsRequest())).connections == []
    disconnected = await stub.DisconnectConnection(
        pb.DisconnectConnectionRequest(connection_id="s1")
    )
    assert disconnected.removed is False


async def test_heartbeat_reports_the_instances_connections(stub) -> None:
    await stub.JoinConversation(
        pb.JoinConversationRequest(
            conversation_id="c1", connection_id="s1", client_instance_id="web1"
        )
    )
    beat = await stub.Heartbeat(pb.HeartbeatRequest(client_instance_id="web1"))
    assert beat.connection_count == 1
    assert beat.ttl_seconds > 0


async def test_health_serving_then_not_serving_on_shutdown(app) -> None:
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "convsvc.v1.ConversationService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await app.server.enter_shutdown()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(app) -> int:
    """The server's overall health status, asked over its own channel."""
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return int(reply.status)


async def test_a_failed_store_answers_unavailable_and_turns_health_not_serving(app, stub) -> None:
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
    # The next commit fails as a broken disk would: nothing can be written any more.
    with contextlib.closing(sqlite3.connect(app.settings.storage.sqlite_path)) as other:
        other.execute("DROP TABLE events")
        other.commit()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message("x")))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "STORAGE_FAILED"
    assert "event store failed" in (caught.value.details() or "")
    assert await health_of(app) == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_log_conflict_aborts_that_conversation_and_the_node_keeps_serving(
    app, stub
) -> None:
    for cid in ("c1", "c2"):
        await stub.StartConversation(pb.StartConversationRequest(conversation_id=cid))
        await grpc_events_until(stub, cid, agent_state_is("awaiting_user_input"))
    # Another writer takes c1's next id behind the server's back.
    with contextlib.closing(sqlite3.connect(app.settings.storage.sqlite_path)) as other:
        other.execute("INSERT INTO events (conversation_id, id, encoded) VALUES ('c1', 2, x'')")
        other.commit()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message("x")))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_info(caught.value).reason == "LOG_CONFLICT"
    assert await health_of(app) == health_pb2.HealthCheckResponse.SERVING
    sent = await stub.SendEvent(pb.SendEventRequest(conversation_id="c2", event=message("y")))
    assert sent.event_id == 2


async def test_eviction_status_update_reaches_streams_over_grpc(tmp_path) -> None:
    async with (
        running_app(tmp_path / "data", engine=EngineConfig(max_concurrent_conversations=1)) as app,
        grpc.aio.insecure_channel(app.server.address) as channel,
    ):
        stub = pb_grpc.ConversationServiceStub(channel)
        await stub.StartConversation(
            pb.StartConversationRequest(conversation_id="first", user_id="alice")
        )
        call = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="first"), timeout=10)
        await call.read()  # subscribed and caught up
        await stub.StartConversation(
            pb.StartConversationRequest(conversation_id="second", user_id="alice")
        )
        update = None
        while update is None:
            response = await call.read()
            if response.HasField("status_update"):
                update = struct_to_dict(response.status_update)
        call.cancel()
    assert update is not None
    assert update["id"] == "AGENT_ERROR$TOO_MANY_CONVERSATIONS"
    assert update["status_update"] is True


async def test_echo_reply_delay_keeps_the_agent_running_meanwhile(stub) -> None:
    settings = struct_pb2.Struct()
    settings.update({"echo_reply_delay_seconds": 5})
    await stub.StartConversation(
        pb.StartConversationRequest(conversation_id="c1", settings=settings)
    )
    await stub.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message("slow")))
    await grpc_events_until(stub, "c1", agent_state_is("running"))
    got = await stub.GetConversation(pb.GetConversationRequest(conversation_id="c1"))
    assert got.conversation.agent_state == "running"  # the echo is still being "thought about"
