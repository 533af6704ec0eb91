"""The clients' WatchConversations, Connect and admission policies against a real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from convclient import (
    AdmissionPolicy,
    AsyncConvsvcClient,
    ChangeKind,
    ConversationStatus,
    ConvsvcClient,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    WatchUpdate,
)
from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.client.test_client_calls import HI, address
from tests.conftest import running_app


def echoed(payloads: list[dict], text: str) -> bool:
    return any(p.get("source") == "agent" and p.get("message") == text for p in payloads)


async def test_async_connect_sends_and_receives_on_one_stream(app: ConvsvcApp) -> None:
    async with AsyncConvsvcClient(address=address(app), timeout_seconds=10) as client:
        async with client.connect("c1", connection_id="s1", user_id="alice") as session:
            assert session.connection is not None and session.connection.connection_id == "s1"
            sent = await session.send(HI)
            assert sent.conversation_id == "c1"
            payloads: list[dict] = []
            async with asyncio.timeout(10):
                async for batch in session.events():
                    payloads += [e.payload for e in batch.events]
                    if echoed(payloads, "hi"):
                        break
            assert sent.event_id in [p["id"] for p in payloads]
            with pytest.raises(InvalidArgumentError) as caught:  # a bad send, the stream goes on
                await session.send({"args": {}})
            assert caught.value.reason == "INVALID_EVENT"
            assert (await session.send(HI)).event_id > sent.event_id
        assert [c async for c in client.iter_connections()] == []  # leaving disconnected it


async def test_async_watch_and_queued_start(tmp_path) -> None:
    async with (
        running_app(tmp_path / "data", engine={"max_concurrent_conversations": 1}) as app,
        AsyncConvsvcClient(address=address(app), timeout_seconds=10) as client,
    ):
        await client.start_conversation("a", user_id="alice")
        watch = client.watch_conversations(user_id="alice")
        first = await anext(watch)
        assert [w.conversation.conversation_id for w in first.snapshot or []] == ["a"]

        with pytest.raises(ResourceExhaustedError) as caught:
            await client.start_conversation(
                "b", user_id="alice", admission_policy=AdmissionPolicy.REJECT
            )
        assert caught.value.reason == "TOO_MANY_CONVERSATIONS"
        assert caught.value.metadata["running_conversation_ids"] == "a"

        queued = asyncio.create_task(
            client.start_conversation("b", user_id="alice", admission_policy="queue")
        )
        change = await next_change(watch, "b")
        assert change.kind is ChangeKind.CREATED
        assert change.watched.conversation.status is ConversationStatus.QUEUED
        seen = await client.get_conversation("b", user_id="alice")
        assert (seen.status, seen.queue_position) == (ConversationStatus.QUEUED, 1)

        await client.close_conversation("a")
        started = await asyncio.wait_for(queued, 10)
        assert started.status in (ConversationStatus.STARTING, ConversationStatus.RUNNING)
        await watch.aclose()


async def next_change(watch, cid: str):
    async with asyncio.timeout(10):
        async for update in watch:
            for change in update.changes:
                if change.watched.conversation.conversation_id == cid:
                    return change
    raise AssertionError("the watch ended")


async def test_async_watch_resumes_across_a_server_restart_with_a_new_snapshot(tmp_path) -> None:
    data = tmp_path / "data"
    async with running_app(data) as app:
        port = app.server.address.rsplit(":", 1)[1]
    # A fixed port, so the client finds the restarted server where it was.
    async with (
        running_app(data, listen=f"127.0.0.1:{port}") as app,
        AsyncConvsvcClient(
            address=address(app), timeout_seconds=10, stream_reconnect_seconds=20
        ) as client,
    ):
        await client.start_conversation("c1")
        watch = client.watch_conversations()
        assert [w.conversation.conversation_id for w in (await anext(watch)).snapshot] == ["c1"]
        await app.stop()

        async def next_snapshot() -> WatchUpdate:
            async for update in watch:
                if update.snapshot is not None:
                    return update
            raise AssertionError("the watch ended")

        snapshot = asyncio.ensure_future(next_snapshot())
        async with running_app(data, listen=f"127.0.0.1:{port}"):
            # The new process cannot resume the old one's token: a snapshot, now empty.
            assert (await asyncio.wait_for(snapshot, 20)).snapshot == []
        await watch.aclose()


async def test_blocking_watch_and_connect(app: ConvsvcApp) -> None:
    # The blocking client runs in a thread: the server shares this test's event loop.
    await asyncio.wait_for(asyncio.to_thread(watch_and_connect_blocking, address(app)), 20)


def watch_and_connect_blocking(server_address: str) -> None:
    with ConvsvcClient(address=server_address, timeout_seconds=10) as client:
        watch = client.watch_conversations()
        assert next(watch).snapshot == []
        with client.connect("c1", connection_id="s1") as session:
            sent = session.send(HI)
            payloads: list[dict] = []
            for batch in session.events():
                payloads += [e.payload for e in batch.events]
                if echoed(payloads, "hi"):
                    break
            assert sent.event_id in [p["id"] for p in payloads]
        kinds: list[ChangeKind] = []
        connection_counts: list[int] = []
        for update in watch:
            for change in update.changes:
                kinds.append(change.kind)
                if change.kind is ChangeKind.CONNECTIONS_CHANGED:
                    connection_counts.append(len(change.watched.connection_ids))
            if connection_counts[-2:] == [1, 0]:
                break
        assert kinds[0] is ChangeKind.CREATED
        watch.close()


def test_blocking_watch_gives_up_when_the_service_stays_away() -> None:
    with ConvsvcClient(
        address="127.0.0.1:9", timeout_seconds=1, stream_reconnect_seconds=0.5
    ) as client:
        with pytest.raises(ServiceUnavailableError) as caught:
            next(client.watch_conversations())
        assert caught.value.reason == "STREAM_LOST"


class _CancelledOnce(pb_grpc.ConversationServiceServicer):  # type: ignore[misc]
    """A server whose first watch ends CANCELLED, as a call accepted in the instant before a
    server stops is cancelled by the stop; the next one answers a snapshot."""

    def __init__(self) -> None:
        self.calls = 0

    async def WatchConversations(self, request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            await context.abort(grpc.StatusCode.CANCELLED, "the server stopped")
        yield pb.WatchConversationsResponse(snapshot_complete=True, resume_token="t1")
        await asyncio.Event().wait()  # then nothing changes


async def test_a_stream_the_server_cancelled_is_resumed_not_ended() -> None:
    server = grpc.aio.server()
    servicer = _CancelledOnce()
    pb_grpc.add_ConversationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncConvsvcClient(address=f"127.0.0.1:{port}", timeout_seconds=5) as client:
            updates = client.watch_conversations()
            first = await asyncio.wait_for(updates.__anext__(), 10)
            assert first.snapshot == [] and servicer.calls == 2
            await updates.aclose()
    finally:
        await server.stop(None)
