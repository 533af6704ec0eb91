"""ConversationMirror (what RemoteConversationManager answers lists from) against a real server:
live answers, reads of own writes, and falling back when the watch is unavailable."""

from __future__ import annotations

import asyncio

import grpc

from convclient import AsyncConvsvcClient
from convclient.mirror import ConversationMirror
from convsvc.app import ConvsvcApp
from tests.client.test_client_calls import address
from tests.conftest import running_app


async def test_the_mirror_matches_the_service_lists(app: ConvsvcApp) -> None:
    async with AsyncConvsvcClient(address=address(app), timeout_seconds=10) as client:
        await client.start_conversation("before", user_id="alice")
        mirror = ConversationMirror(client)
        mirror.start()
        await asyncio.wait_for(mirror.wait_live(), 10)
        assert [c.conversation_id for c in mirror.running("", None)] == ["before"]

        await client.join_conversation("c2", "s2", user_id="bob")
        await mirror.settle(lambda m: m.has_connection("c2", "s2"))
        listed = [c.conversation_id async for c in client.iter_conversations()]
        assert [c.conversation_id for c in mirror.running("", None)] == listed == ["before", "c2"]
        assert mirror.connections("bob", None) == {"s2": "c2"}
        assert mirror.connections("alice", None) == {}
        assert [c.conversation_id for c in mirror.running("bob", {"c2", "x"})] == ["c2"]

        await client.close_conversation("c2")
        await mirror.settle(lambda m: not m.has_conversation("c2"))
        assert [c.conversation_id for c in mirror.running("", None)] == ["before"]
        await mirror.stop()


async def test_the_mirror_is_not_live_while_the_service_is_away(tmp_path) -> None:
    data = tmp_path / "data"
    async with running_app(data) as app:
        port = app.server.address.rsplit(":", 1)[1]
    listen = f"127.0.0.1:{port}"
    async with (
        running_app(data, listen=listen) as app,
        AsyncConvsvcClient(
            address=listen, timeout_seconds=5, stream_reconnect_seconds=60
        ) as client,
    ):
        await client.start_conversation("c1")
        mirror = ConversationMirror(client)
        mirror.start()
        await asyncio.wait_for(mirror.wait_live(), 10)
        await app.stop()
        async with asyncio.timeout(10):
            while mirror.live:  # the stream's end is reported: answers would be stale
                await mirror.settle(lambda m: not m.live)
        async with running_app(data, listen=listen):
            await asyncio.wait_for(mirror.wait_live(), 20)
            assert mirror.running("", None) == []  # the restart stopped c1
        await mirror.stop()


async def test_a_service_without_the_watch_leaves_the_mirror_off() -> None:
    server = grpc.aio.server()  # a real gRPC server offering no ConversationService at all
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with AsyncConvsvcClient(address=f"127.0.0.1:{port}", timeout_seconds=5) as client:
        mirror = ConversationMirror(client)
        mirror.start()
        await asyncio.wait_for(mirror.following_ended(), 10)  # UNIMPLEMENTED is final
        assert not mirror.live
        await mirror.settle(lambda m: False)  # and returns at once rather than waiting
    await server.stop(None)
