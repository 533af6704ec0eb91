"""Clients that call the owner: the service says where each conversation runs, convclient's
clients send its calls there, and fall back to forwarding when what they knew went stale."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from convclient import AsyncConvsvcClient, ConvsvcClient
from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.conftest import Cluster, Node
from tests.service.test_watch import Watch

NOTE = {"action": "note", "args": {"n": 1}}
FORWARDS = "convsvc_cluster_forwards_total"


async def forwards(*nodes: Node) -> float:
    return sum([await node.metric(FORWARDS) for node in nodes])


async def owner_seen_by_watch(client: AsyncConvsvcClient, cid: str, addresses: set[str]) -> str:
    """Reads a watch (resumed when a node stops) until ``cid`` runs at one of ``addresses``."""
    async for update in client.watch_conversations(conversation_ids=[cid]):
        for item in [*(update.snapshot or []), *(c.watched for c in update.changes)]:
            if item.conversation.owner_address in addresses:
                return item.conversation.owner_address
    raise AssertionError("a watch does not end")


async def test_every_answer_about_a_conversation_names_the_node_that_runs_it(
    cluster: Callable[..., Cluster],
) -> None:
    a, b = cluster(2).nodes
    started = await b.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv", user_id="alice")
    )
    assert started.conversation.owner_address == b.address
    got = a.stub.GetConversation(pb.GetConversationRequest(conversation_id="conv"))
    assert (await got).conversation.owner_address == b.address
    # Forwarded by a: its answer's header names the owner for clients that route.
    assert ("x-convsvc-owner", b.address) in tuple(await got.initial_metadata())
    joined = await a.stub.JoinConversation(
        pb.JoinConversationRequest(conversation_id="conv", connection_id="tab")
    )
    assert joined.conversation.owner_address == b.address
    listed = await a.stub.ListConversations(pb.ListConversationsRequest())
    assert [c.owner_address for c in listed.conversations] == [b.address]
    watch = Watch(a.stub)
    assert (await watch.snapshot())["conv"].conversation.owner_address == b.address
    watch.call.cancel()

    closed = await a.stub.CloseConversation(pb.CloseConversationRequest(conversation_id="conv"))
    assert closed.conversation.owner_address == ""  # stopped: nobody runs it
    here = b.stub.GetConversation(pb.GetConversationRequest(conversation_id="conv"))
    assert (await here).conversation.owner_address == ""
    assert "x-convsvc-owner" not in dict(tuple(await here.initial_metadata()))


async def test_a_routing_client_sends_a_conversations_calls_to_its_owner(
    cluster: Callable[..., Cluster],
) -> None:
    a, b = cluster(2).nodes
    await b.stub.StartConversation(pb.StartConversationRequest(conversation_id="conv"))
    before = await forwards(a, b)
    async with AsyncConvsvcClient(address=a.address) as client:
        first = await client.send_event(NOTE, conversation_id="conv")  # forwarded: learns b
        assert await forwards(a, b) == before + 1
        sent = [await client.send_event(NOTE, conversation_id="conv") for _ in range(10)]
        conversation, connection = await client.join_conversation("conv", "tab")
        assert conversation.owner_address == b.address
        by_connection = await client.send_event(NOTE, connection_id=connection.connection_id)
        assert await client.disconnect("tab")
        assert (await client.get_conversation("conv")).owner_address == b.address
        assert await forwards(a, b) == before + 1  # none of these took the extra hop
    assert [r.event_id for r in sent] == list(range(first.event_id + 1, first.event_id + 11))
    assert by_connection.event_id == sent[-1].event_id + 1

    # Without routing (or from grpcurl, or another language) every call is forwarded.
    async with AsyncConvsvcClient(address=a.address, route_to_owner=False) as plain:
        for _ in range(3):
            await plain.send_event(NOTE, conversation_id="conv")
    assert await forwards(a, b) == before + 4

    # The blocking client routes too.
    with ConvsvcClient(address=a.address) as blocking:
        await asyncio.to_thread(blocking.send_event, NOTE, conversation_id="conv")
        for _ in range(3):
            await asyncio.to_thread(blocking.send_event, NOTE, conversation_id="conv")
    assert await forwards(a, b) == before + 5


async def test_a_client_follows_a_conversation_that_moved_to_another_node(
    cluster: Callable[..., Cluster],
) -> None:
    a, b, c = cluster(3).nodes
    await b.stub.StartConversation(pb.StartConversationRequest(conversation_id="conv"))
    async with AsyncConvsvcClient(address=a.address) as client:
        assert (await client.get_conversation("conv")).owner_address == b.address
        # Moved behind the client's back: stopped on b, started on c.
        await c.stub.CloseConversation(pb.CloseConversationRequest(conversation_id="conv"))
        restarted = await c.stub.StartConversation(
            pb.StartConversationRequest(conversation_id="conv")
        )
        assert restarted.conversation.owner_address == c.address
        before = await forwards(a, b, c)
        # Sent to b, which forwards it to c and names c: the next calls go to c.
        await client.send_event(NOTE, conversation_id="conv")
        assert await forwards(a, b, c) == before + 1
        await client.send_event(NOTE, conversation_id="conv")
        assert await forwards(a, b, c) == before + 1

        # c stops and hands its conversations over: the call to c fails at once and goes
        # through a, which runs the conversation now or forwards it to b, which does.
        c.process.process.terminate()  # SIGTERM: a graceful stop
        new_owner = await asyncio.wait_for(
            owner_seen_by_watch(client, "conv", {a.address, b.address}), 30
        )
        moved = await client.send_event(NOTE, conversation_id="conv")
        assert (await client.get_conversation("conv")).owner_address == new_owner
    log = await a.stub.SearchEvents(pb.SearchEventsRequest(conversation_id="conv"))
    assert moved.event_id in [e.id for e in log.events]
