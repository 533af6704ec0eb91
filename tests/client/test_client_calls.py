"""The async and blocking clients against a real server: typed answers and typed errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from convclient import (
    AsyncConvsvcClient,
    ConversationStatus,
    ConvsvcClient,
    EventBatch,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from convsvc.app import ConvsvcApp

HI = {"action": "message", "args": {"content": "hi"}}


def address(app: ConvsvcApp) -> str:
    assert app.server is not None
    return app.server.address


@pytest.fixture
async def client(app: ConvsvcApp) -> AsyncIterator[AsyncConvsvcClient]:
    async with AsyncConvsvcClient(address=address(app), timeout_seconds=10) as opened:
        yield opened


async def batches_until_echo(
    client: AsyncConvsvcClient, conversation_id: str, content: str, start_id: int = 0
) -> list[EventBatch]:
    batches: list[EventBatch] = []
    async with asyncio.timeout(10):
        async for batch in client.tail_events(conversation_id, start_id=start_id):
            batches.append(batch)
            if any(
                e.source == "agent" and e.payload.get("message") == content for e in batch.events
            ):
                return batches
    raise AssertionError("the tail ended")


async def test_lifecycle_with_typed_answers(client: AsyncConvsvcClient) -> None:
    started = await client.start_conversation(
        "c1", user_id="alice", settings={"llm_model": "x"}, initial_user_message=HI
    )
    assert started.conversation_id == "c1"
    assert started.user_id == "alice"
    assert started.agent == "echo"
    assert started.create_time is not None

    conversation, connection = await client.join_conversation(
        "c1", "sid-1", user_id="alice", client_instance_id="web-1"
    )
    assert connection.connection_id == "sid-1"
    assert connection.client_instance_id == "web-1"
    assert conversation.connection_count == 1

    batches = await batches_until_echo(client, "c1", "hi")
    events = [e for b in batches for e in b.events]
    assert [e.id for e in events] == list(range(len(events)))
    first_user = next(e for e in events if e.source == "user")
    assert first_user.kind == "action"
    assert first_user.name == "message"
    assert first_user.payload["args"]["content"] == "hi"

    sent = await client.send_event(
        {"action": "message", "args": {"content": "again"}}, connection_id="sid-1", user_id="alice"
    )
    assert sent.conversation_id == "c1"
    later = await batches_until_echo(client, "c1", "again", start_id=sent.event_id)
    assert later[0].events[0].id == sent.event_id

    by_conversation = await client.send_event(
        {"action": "message", "args": {"content": "direct"}}, conversation_id="c1"
    )
    assert by_conversation.event_id > sent.event_id

    got = await client.get_conversation("c1", user_id="alice")
    assert got.status is ConversationStatus.RUNNING
    assert got.latest_event_id >= by_conversation.event_id

    assert [c.conversation_id async for c in client.iter_conversations(user_id="alice")] == ["c1"]
    assert [c.connection_id async for c in client.iter_connections(conversation_ids=["c1"])] == [
        "sid-1"
    ]
    assert await client.disconnect("sid-1", user_id="alice") is True
    assert await client.disconnect("sid-1", user_id="alice") is False  # idempotent

    closed = await client.close_conversation("c1", user_id="alice")
    assert closed.status is ConversationStatus.STOPPED
    with pytest.raises(FailedPreconditionError) as caught:
        await client.send_event(HI, conversation_id="c1")
    assert caught.value.reason == "CONVERSATION_NOT_RUNNING"


async def test_search_pages_and_limits(client: AsyncConvsvcClient) -> None:
    await client.start_conversation("c1")
    for n in range(5):
        await client.send_event(
            {"action": "message", "args": {"content": f"m{n}"}}, conversation_id="c1"
        )
    page = await client.search_events("c1", page_size=3)
    assert [e.id for e in page.items] == [0, 1, 2]
    assert page.next_page_token
    everything = [e.id async for e in client.iter_events("c1", page_size=2)]
    assert everything == list(range(len(everything)))
    assert [e.id async for e in client.iter_events("c1", start_id=2, end_id=4)] == [2, 3, 4]
    assert [e.id async for e in client.iter_events("c1", reverse=True, limit=3)] == [
        everything[-1],
        everything[-2],
        everything[-3],
    ]


async def test_errors_are_typed_with_reasons(client: AsyncConvsvcClient) -> None:
    with pytest.raises(NotFoundError) as not_found:
        await client.get_conversation("missing")
    assert not_found.value.reason == "CONVERSATION_NOT_FOUND"
    assert not_found.value.metadata == {"conversation_id": "missing"}
    assert "missing" in str(not_found.value)

    with pytest.raises(InvalidArgumentError) as bad_id:
        await client.start_conversation("bad id")
    assert bad_id.value.reason == "INVALID_ID"

    await client.start_conversation("c1", user_id="alice")
    with pytest.raises(NotFoundError):  # another user's conversation looks absent
        await client.get_conversation("c1", user_id="bob")

    with pytest.raises(NotFoundError) as tail_error:
        async for _ in client.tail_events("missing"):
            pass
    assert tail_error.value.reason == "CONVERSATION_NOT_FOUND"

    with pytest.raises(ValueError, match="exactly one"):
        await client.send_event(HI)


async def test_a_retried_send_takes_effect_once(client: AsyncConvsvcClient) -> None:
    await client.start_conversation("c1")
    first = await client.send_event(HI, conversation_id="c1", request_id="req-1")
    again = await client.send_event(HI, conversation_id="c1", request_id="req-1")
    assert again == first
    users = [e async for e in client.iter_events("c1") if e.source == "user"]
    assert len(users) == 1


async def test_blocking_client(app: ConvsvcApp) -> None:
    # The server shares this test's event loop, so the blocking calls run on another thread.
    await asyncio.to_thread(use_blocking_client, address(app))


def use_blocking_client(server_address: str) -> None:
    with ConvsvcClient(address=server_address) as client:
        client.start_conversation("c1", user_id="alice")
        sent = client.send_event(HI, conversation_id="c1", user_id="alice")
        events = list(client.iter_events("c1", user_id="alice", start_id=sent.event_id))
        assert events[0].payload["message"] == "hi"
        assert client.all_conversation_ids(user_id="alice") == ["c1"]
        with pytest.raises(NotFoundError):
            client.get_conversation("c1", user_id="bob")
        assert client.heartbeat("web-1").ttl_seconds > 0
        # The calls issue 20 added, blocking too.
        client.update_conversation("c1", labels={"team": "red"}, title="Blocking")
        [found] = client.search_conversations(labels={"team": "red"}).items
        assert (found.conversation_id, found.title) == ("c1", "Blocking")
        fork = client.fork_conversation("c1", conversation_id="c1-fork", user_id="alice")
        assert fork.labels == {"team": "red"}
        with pytest.raises(FailedPreconditionError):  # nothing waits for a decision
            client.approve_action("c1", 0, user_id="alice")
        assert client.pause_agent("c1").agent_state == "awaiting_user_input"  # nothing to do
        assert client.list_webhooks() == []
        assert client.list_webhook_deliveries().items == []
