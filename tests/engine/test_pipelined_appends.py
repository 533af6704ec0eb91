"""Appends are pipelined: a loop sees a user event and emits without waiting for each commit,
so its answer shares the commit of the event it answers; nothing is seen before it is
durable, ``flush`` waits for durability, and a failed store reaches the loop."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any, ClassVar

import pytest

from convsvc.agents import BUILTIN_AGENTS as AGENTS
from convsvc.agents import AgentLoop, agent_state_changed
from convsvc.domain import ConversationStatus, Event, EventSource, StoredEvent
from convsvc.errors import ConvsvcError
from convsvc.storage import ConversationLogError, StorageError
from tests.conftest import EngineHarness
from tests.helpers import echo_of, engine_events_until, settled


def message(text: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": text}}


def record_commits(harness: EngineHarness) -> list[list[Event]]:
    """Listens to the store beside the engine; returns the committed batches as they come."""
    batches: list[list[Event]] = []
    harness.store.add_commit_listener(lambda events: batches.append(list(events)))
    return batches


async def test_the_echo_answer_is_committed_with_the_message_it_answers(
    engine: EngineHarness,
) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    await settled(engine.engine, "c1")
    commits = record_commits(engine)
    _, message_id = await engine.engine.send_event(conversation_id="c1", event=message("hi"))
    await engine_events_until(engine.engine, "c1", echo_of("hi"))
    # One commit: the message, running, the echo, awaiting_user_input.
    assert [[(e.id, e.source) for e in batch] for batch in commits] == [
        [(message_id, "user"), (3, "environment"), (4, "agent"), (5, "environment")]
    ]


class FlushingAgent(AgentLoop):
    """Records, at each flush, which of the events so far the store already holds."""

    name = "flushing"
    seen: ClassVar[list[tuple[int, int]]] = []
    all_seen: ClassVar[asyncio.Event]
    store: ClassVar[Any] = None  # the harness's store, set by the test

    async def start(self) -> None:
        await self.context.emit(agent_state_changed("awaiting_user_input"), EventSource.ENVIRONMENT)

    async def on_user_event(self, event: dict[str, Any]) -> None:
        last = event["id"]
        for n in range(3):
            last = await self.context.emit(
                {"action": "message", "args": {"content": f"part {n}"}}, EventSource.AGENT
            )
        await self.context.flush()
        durable = await FlushingAgent.store.latest_event_id(self.context.conversation_id)
        FlushingAgent.seen.append((last, durable))
        if len(FlushingAgent.seen) == 3:
            FlushingAgent.all_seen.set()


async def test_flush_returns_once_everything_appended_is_durable(make_engine) -> None:
    harness: EngineHarness = await make_engine(agents={"flushing": FlushingAgent})
    FlushingAgent.seen = []
    FlushingAgent.all_seen = asyncio.Event()
    FlushingAgent.store = harness.store
    await harness.engine.start_conversation(conversation_id="c1", agent="flushing")
    for n in range(3):
        await harness.engine.send_event(conversation_id="c1", event=message(f"m{n}"))
    await asyncio.wait_for(FlushingAgent.all_seen.wait(), 10)
    for last_emitted, durable_up_to in FlushingAgent.seen:
        assert durable_up_to >= last_emitted


class StoreWatchingAgent(AgentLoop):
    """Answers, then flushes, recording what the flush said."""

    name = "watching"
    outcome: ClassVar[list[BaseException | None]]
    flushed: ClassVar[asyncio.Event]

    async def start(self) -> None:
        await self.context.emit(agent_state_changed("awaiting_user_input"), EventSource.ENVIRONMENT)

    async def on_user_event(self, event: dict[str, Any]) -> None:
        await self.context.emit({"action": "message", "args": {"content": "a"}}, EventSource.AGENT)
        try:
            await self.context.flush()
        except (ConvsvcError, StorageError) as exc:
            StoreWatchingAgent.outcome.append(exc)
            raise
        else:
            StoreWatchingAgent.outcome.append(None)
        finally:
            StoreWatchingAgent.flushed.set()


async def test_a_log_conflict_fails_the_send_stops_that_loop_and_spares_the_others(
    make_engine,
) -> None:
    harness: EngineHarness = await make_engine(agents={"watching": StoreWatchingAgent, **AGENTS})
    StoreWatchingAgent.outcome = []
    StoreWatchingAgent.flushed = asyncio.Event()
    engine = harness.engine
    await engine.start_conversation(conversation_id="c1", agent="watching")
    await engine.start_conversation(conversation_id="c2", agent="echo")
    await settled(engine, "c1")
    await settled(engine, "c2")
    # Another writer (a stale node, a hand edit) takes c1's next id behind the engine's back.
    with contextlib.closing(sqlite3.connect(harness.path)) as other:
        other.execute("INSERT INTO events (conversation_id, id, encoded) VALUES ('c1', 2, x'00')")
        other.commit()
    with pytest.raises(ConversationLogError):
        await engine.send_event(conversation_id="c1", event=message("lost"))
    await asyncio.wait_for(StoreWatchingAgent.flushed.wait(), 5)
    assert isinstance(StoreWatchingAgent.outcome[0], ConvsvcError)  # the loop learns it
    assert not harness.store.failed
    # The conflicting loop is stopped; the other conversation goes on untouched.
    await asyncio.wait_for(engine.queries.while_here("c1"), 5)
    assert (await engine.queries.get_conversation("c1")).status is ConversationStatus.STOPPED
    await engine.send_event(conversation_id="c2", event=message("fine"))
    await engine_events_until(engine, "c2", echo_of("fine"))
    # Started again, c1 continues after what is stored, the other writer's event included.
    await engine.start_conversation(conversation_id="c1", agent="echo")
    sent = await engine.send_event(conversation_id="c1", event=message("again"))
    assert sent == ("c1", 5)  # 0 loading, 1 ready, 2 the other writer's, 3 loading, 4 ready


async def test_a_failed_store_fails_the_send_and_reaches_the_loop(make_engine) -> None:
    harness: EngineHarness = await make_engine(agents={"watching": StoreWatchingAgent})
    StoreWatchingAgent.outcome = []
    StoreWatchingAgent.flushed = asyncio.Event()
    engine = harness.engine
    await engine.start_conversation(conversation_id="c1", agent="watching")
    await settled(engine, "c1")
    with contextlib.closing(sqlite3.connect(harness.path)) as other:
        other.execute("DROP TABLE events")  # as a broken disk would: nothing can be written
        other.commit()
    with pytest.raises(StorageError):
        await engine.send_event(conversation_id="c1", event=message("lost"))
    await asyncio.wait_for(StoreWatchingAgent.flushed.wait(), 5)
    assert isinstance(StoreWatchingAgent.outcome[0], StorageError)
    assert harness.store.failed


async def test_live_subscribers_see_only_committed_events(engine: EngineHarness) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    await settled(engine.engine, "c1")
    commits = record_commits(engine)
    streamed: list[int] = []

    async def follow() -> None:
        async for batch in engine.engine.history.stream_events(conversation_id="c1", start_id=2):
            committed = {e.id for commit in commits for e in commit}
            for item in batch:
                assert isinstance(item, StoredEvent)
                assert item.id in committed  # published only after its commit
                streamed.append(item.id)
            if len(streamed) >= 8:
                return

    follower = asyncio.create_task(follow())
    await engine.engine.send_event(conversation_id="c1", event=message("one"))
    await engine.engine.send_event(conversation_id="c1", event=message("two"))
    await asyncio.wait_for(follower, 10)
    assert streamed == list(range(2, 10))
