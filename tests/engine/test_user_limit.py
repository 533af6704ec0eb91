"""A user's new loop closes their least recently active ones beyond the limit, after
telling each that it is being closed."""

from __future__ import annotations

import asyncio

from convsvc.codec import decode_event
from convsvc.domain import ConversationStatus, StatusUpdate, StoredEvent
from convsvc.engine import TOO_MANY_CONVERSATIONS
from tests.conftest import EngineHarness
from tests.helpers import settled


async def test_new_start_closes_the_least_recently_active_after_a_status_event(
    make_engine, clock
) -> None:
    harness: EngineHarness = await make_engine(max_concurrent_conversations=2)
    engine = harness.engine
    await engine.start_conversation(conversation_id="old", user_id="alice")
    await settled(engine, "old")  # agent events count as activity: let them land first
    clock.advance(10)
    await engine.start_conversation(conversation_id="mid", user_id="alice")
    await settled(engine, "mid")
    clock.advance(10)
    await engine.join_conversation(conversation_id="old", connection_id="s1", user_id="alice")
    clock.advance(10)  # "old" was joined last, so "mid" is now the least recently active
    await engine.start_conversation(conversation_id="other-user", user_id="bob")

    await engine.start_conversation(conversation_id="new", user_id="alice")

    running = {v.conversation_id for v in engine.queries.list_conversations(user_id="alice")[0]}
    assert running == {"old", "new"}
    assert (await engine.queries.get_conversation("mid")).status is ConversationStatus.STOPPED
    assert {v.conversation_id for v in engine.queries.list_conversations(user_id="bob")[0]} == {
        "other-user"
    }


async def test_evicted_subscribers_get_the_status_event_before_the_stop(make_engine) -> None:
    harness: EngineHarness = await make_engine(max_concurrent_conversations=1)
    engine = harness.engine
    await engine.start_conversation(conversation_id="first", user_id="alice")
    items: list = []
    subscribed = asyncio.Event()

    def is_stop(item) -> bool:
        return (
            isinstance(item, StoredEvent)
            and decode_event(item.encoded).payload.get("extras", {}).get("agent_state") == "stopped"
        )

    async def watch() -> None:
        async for batch in engine.history.stream_events(conversation_id="first"):
            items.extend(batch)
            subscribed.set()
            if any(is_stop(i) for i in items):
                return

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(subscribed.wait(), 10)
    await engine.start_conversation(conversation_id="second", user_id="alice")
    await asyncio.wait_for(watcher, 10)

    status_index = next(i for i, item in enumerate(items) if isinstance(item, StatusUpdate))
    stop_index = next(i for i, item in enumerate(items) if is_stop(item))
    assert status_index < stop_index
    status = items[status_index].payload
    assert status["status_update"] is True and status["type"] == "error"
    assert status["id"] == TOO_MANY_CONVERSATIONS
    assert "limit is 1" in status["message"]


async def test_starting_a_running_conversation_never_evicts(make_engine) -> None:
    harness: EngineHarness = await make_engine(max_concurrent_conversations=1)
    await harness.engine.start_conversation(conversation_id="only", user_id="alice")
    await harness.engine.start_conversation(conversation_id="only", user_id="alice")
    assert [v.conversation_id for v in harness.engine.queries.list_conversations()[0]] == ["only"]
