"""Admission policies at the per-user limit: evict_oldest (OpenHands'), evict_idle_only,
reject and queue, set for the server or per start."""

from __future__ import annotations

import asyncio

import pytest

from convsvc.agents import EchoAgent
from convsvc.domain import AdmissionPolicy, ConversationStatus
from convsvc.errors import DeadlineExceeded, FailedPrecondition, NotFound, ResourceExhausted
from tests.conftest import EngineHarness
from tests.helpers import (
    BusyAgent,
    agent_state_is,
    engine_events_until,
    engine_reports,
    settled,
)

AGENTS = {"busy": BusyAgent, "echo": EchoAgent}
BUSY = {"action": "message", "args": {"content": "work"}}


async def running_ids(engine, user: str = "alice") -> set[str]:
    return {v.conversation_id for v in engine.queries.list_conversations(user_id=user)[0]}


async def make_busy(engine, cid: str, policy: AdmissionPolicy | None = None) -> None:
    """A conversation whose agent is running (until BusyAgent.release is set)."""
    await engine.start_conversation(
        conversation_id=cid, user_id="alice", agent="busy", admission_policy=policy
    )
    await settled(engine, cid)
    await engine.send_event(conversation_id=cid, user_id="alice", event=BUSY)
    await engine_events_until(engine, cid, agent_state_is("running"))
    await engine_reports(engine, cid, "running")


async def until_queued(watch, cid: str, position: int) -> None:
    """Reads the engine's watch until ``cid`` is queued at ``position``."""
    async with asyncio.timeout(10):
        async for update in watch:
            for change in update.changes or ():
                view = change.watched.view
                if view.conversation_id == cid and view.queue_position == position:
                    assert view.status is ConversationStatus.QUEUED
                    return


@pytest.fixture
async def busy_engine(make_engine):
    BusyAgent.release = asyncio.Event()
    harness: EngineHarness = await make_engine(max_concurrent_conversations=2, agents=AGENTS)
    yield harness.engine
    BusyAgent.release.set()


async def test_reject_stops_nothing_and_names_the_limit_and_the_running_ids(busy_engine) -> None:
    engine = busy_engine
    for cid in ("a", "b"):
        await engine.start_conversation(conversation_id=cid, user_id="alice")

    with pytest.raises(ResourceExhausted) as caught:
        await engine.start_conversation(
            conversation_id="c", user_id="alice", admission_policy=AdmissionPolicy.REJECT
        )

    assert caught.value.reason == "TOO_MANY_CONVERSATIONS"
    assert caught.value.metadata == {"limit": "2", "running_conversation_ids": "a,b"}
    assert await running_ids(engine) == {"a", "b"}
    with pytest.raises(NotFound):  # the refused start created nothing
        await engine.queries.get_conversation("c")
    # Another user has room of their own.
    await engine.start_conversation(
        conversation_id="d", user_id="bob", admission_policy=AdmissionPolicy.REJECT
    )


async def test_evict_idle_only_stops_an_idle_loop_but_never_a_running_agent(busy_engine) -> None:
    engine = busy_engine
    await make_busy(engine, "working")
    await engine.start_conversation(conversation_id="idle", user_id="alice")
    await settled(engine, "idle")

    # The idle loop is the one this policy may stop, though "working" is older.
    await make_busy(engine, "new", AdmissionPolicy.EVICT_IDLE_ONLY)
    assert await running_ids(engine) == {"working", "new"}
    assert (await engine.queries.get_conversation("idle")).status is ConversationStatus.STOPPED

    # Every slot's agent is running now: nothing may stop.
    with pytest.raises(ResourceExhausted) as caught:
        await engine.start_conversation(
            conversation_id="third",
            user_id="alice",
            admission_policy=AdmissionPolicy.EVICT_IDLE_ONLY,
        )
    assert caught.value.reason == "TOO_MANY_CONVERSATIONS"
    assert caught.value.metadata == {"limit": "2", "running_conversation_ids": "new,working"}
    assert await running_ids(engine) == {"working", "new"}

    # OpenHands' policy stops one of them all the same.
    await engine.start_conversation(conversation_id="third", user_id="alice")
    running = await running_ids(engine)
    assert len(running) == 2 and "third" in running


async def test_the_server_policy_applies_to_starts_and_joins_that_name_none(make_engine) -> None:
    harness: EngineHarness = await make_engine(
        max_concurrent_conversations=1, admission_policy="reject"
    )
    engine = harness.engine
    await engine.start_conversation(conversation_id="a", user_id="alice")
    with pytest.raises(ResourceExhausted):
        await engine.join_conversation(conversation_id="b", connection_id="s", user_id="alice")
    # A start may not ask for a policy that stops more than the server's...
    with pytest.raises(FailedPrecondition) as caught:
        await engine.start_conversation(
            conversation_id="b", user_id="alice", admission_policy=AdmissionPolicy.EVICT_OLDEST
        )
    assert caught.value.reason == "ADMISSION_POLICY_OVERRIDE_NOT_ALLOWED"
    assert await running_ids(engine) == {"a"}
    # ...unless the operator allows it.
    allowing: EngineHarness = await make_engine(
        max_concurrent_conversations=1,
        admission_policy="reject",
        allow_admission_policy_override=True,
    )
    await allowing.engine.start_conversation(conversation_id="a", user_id="alice")
    await allowing.engine.start_conversation(
        conversation_id="b", user_id="alice", admission_policy=AdmissionPolicy.EVICT_OLDEST
    )
    assert await running_ids(allowing.engine) == {"b"}


async def test_queued_starts_wait_in_order_with_their_position_visible(make_engine) -> None:
    harness: EngineHarness = await make_engine(max_concurrent_conversations=1)
    engine = harness.engine
    await engine.start_conversation(conversation_id="a", user_id="alice")
    watch = engine.queries.watch_conversations(user_id="alice")
    assert [w.view.conversation_id for w in (await anext(watch)).snapshot] == ["a"]

    def queue(cid: str) -> asyncio.Task:
        return asyncio.create_task(
            engine.start_conversation(
                conversation_id=cid, user_id="alice", admission_policy=AdmissionPolicy.QUEUE
            )
        )

    b = queue("b")
    await until_queued(watch, "b", 1)
    c = queue("c")
    await until_queued(watch, "c", 2)
    view = await engine.queries.get_conversation("c", "alice")
    assert (view.status, view.queue_position) == (ConversationStatus.QUEUED, 2)
    assert (await engine.queries.get_conversation("b")).queue_position == 1
    with pytest.raises(NotFound):  # a queued start is as private as a running one
        await engine.queries.get_conversation("b", "bob")
    assert await running_ids(engine) == {"a"}  # the list holds what runs, not what waits

    await engine.close_conversation(conversation_id="a")

    started = await asyncio.wait_for(b, 10)
    assert started.status in (ConversationStatus.STARTING, ConversationStatus.RUNNING)
    assert not c.done()
    view = await engine.queries.get_conversation("c")
    assert (view.status, view.queue_position) == (ConversationStatus.QUEUED, 1)
    seen = []
    while not any(
        ch.watched.view.conversation_id == "c" and ch.kind == "queue_position_changed"
        for ch in seen
    ):
        seen += (await asyncio.wait_for(anext(watch), 10)).changes
    assert [ch.kind for ch in seen if ch.watched.view.conversation_id == "a"][-1] == "closed"

    await engine.close_conversation(conversation_id="b")
    await asyncio.wait_for(c, 10)
    assert await running_ids(engine) == {"c"}
    await watch.aclose()


async def test_a_queued_start_gives_up_at_the_queue_timeout(make_engine) -> None:
    harness: EngineHarness = await make_engine(
        max_concurrent_conversations=1, queue_timeout_seconds=0.2
    )
    engine = harness.engine
    await engine.start_conversation(conversation_id="a", user_id="alice")

    with pytest.raises(DeadlineExceeded) as caught:
        await engine.start_conversation(
            conversation_id="b", user_id="alice", admission_policy=AdmissionPolicy.QUEUE
        )

    assert caught.value.reason == "ADMISSION_QUEUE_TIMEOUT"
    with pytest.raises(NotFound):  # it left the queue and never existed
        await engine.queries.get_conversation("b")


async def test_a_cancelled_queued_start_leaves_the_queue_and_the_next_moves_up(
    make_engine,
) -> None:
    harness: EngineHarness = await make_engine(max_concurrent_conversations=1)
    engine = harness.engine
    await engine.start_conversation(conversation_id="a", user_id="alice")
    watch = engine.queries.watch_conversations()
    first = asyncio.create_task(
        engine.start_conversation(
            conversation_id="b", user_id="alice", admission_policy=AdmissionPolicy.QUEUE
        )
    )
    second = asyncio.create_task(
        engine.start_conversation(
            conversation_id="c", user_id="alice", admission_policy=AdmissionPolicy.QUEUE
        )
    )
    await until_queued(watch, "c", 2)

    first.cancel()  # a caller's deadline passing cancels its wait the same way
    with pytest.raises(asyncio.CancelledError):
        await first

    assert (await engine.queries.get_conversation("c")).queue_position == 1
    await engine.close_conversation(conversation_id="a")
    await asyncio.wait_for(second, 10)
    assert await running_ids(engine) == {"c"}
    await watch.aclose()


async def test_a_queued_start_whose_room_another_policy_took_waits_again_first_in_line(
    make_engine,
) -> None:
    harness: EngineHarness = await make_engine(max_concurrent_conversations=1)
    engine = harness.engine
    await engine.start_conversation(conversation_id="a", user_id="alice")
    watch = engine.queries.watch_conversations()
    queued = asyncio.create_task(
        engine.start_conversation(
            conversation_id="q", user_id="alice", admission_policy=AdmissionPolicy.QUEUE
        )
    )
    await until_queued(watch, "q", 1)
    await watch.aclose()

    # "a" stops, and an evict_oldest start arrives while "q" reads its log end.
    await asyncio.gather(
        engine.close_conversation(conversation_id="a"),
        engine.start_conversation(conversation_id="late", user_id="alice"),
    )

    # Never two at once; "q" either runs or waits first in line.
    assert len(await running_ids(engine)) == 1
    if not queued.done():
        assert (await engine.queries.get_conversation("q")).queue_position == 1
        await engine.close_conversation(conversation_id="late")
    await asyncio.wait_for(queued, 10)
    assert await running_ids(engine) == {"q"}


async def test_a_second_start_of_a_queued_conversation_waits_on_when_the_first_gives_up(
    busy_engine,
) -> None:
    engine = busy_engine
    for cid in ("a", "b"):
        await engine.start_conversation(conversation_id=cid, user_id="alice")
    watch = engine.queries.watch_conversations(user_id="alice")
    await anext(watch)  # the snapshot

    def queued_start() -> asyncio.Task:
        return asyncio.create_task(
            engine.start_conversation(
                conversation_id="x", user_id="alice", admission_policy=AdmissionPolicy.QUEUE
            )
        )

    impatient = queued_start()
    await until_queued(watch, "x", 1)
    patient = queued_start()
    await asyncio.sleep(0)  # lets the second start find the first in the queue
    impatient.cancel()  # its caller's deadline
    await asyncio.gather(impatient, return_exceptions=True)
    await until_queued(watch, "x", 1)  # the patient one took its own place
    assert not patient.done()
    await engine.close_conversation(conversation_id="a", user_id="alice")
    view = await asyncio.wait_for(patient, 10)
    assert view.conversation_id == "x" and view.status is not ConversationStatus.STOPPED
    await watch.aclose()


async def test_one_user_s_queue_moving_costs_other_watchers_nothing(make_engine) -> None:
    harness: EngineHarness = await make_engine(
        max_concurrent_conversations=1, watch_history=1000, watch_max_lag=20
    )
    engine = harness.engine
    await engine.start_conversation(conversation_id="running", user_id="alice")
    bobs = engine.queries.watch_conversations(user_id="bob")
    await anext(bobs)
    last = engine.queries.watch_conversations(user_id="alice", conversation_ids=["q59"])
    await anext(last)
    starts = [
        asyncio.create_task(
            engine.start_conversation(
                conversation_id=f"q{n}", user_id="alice", admission_policy=AdmissionPolicy.QUEUE
            )
        )
        for n in range(60)
    ]
    await until_queued(last, "q59", 60)
    # Ten leave the head at once (their callers gave up): the rest move up ten places,
    # and each is told its new place once.
    for start in starts[:10]:
        start.cancel()
    await asyncio.gather(*starts[:10], return_exceptions=True)
    update = await asyncio.wait_for(anext(last), 10)
    assert [(c.kind.value, c.watched.view.queue_position) for c in update.changes] == [
        ("queue_position_changed", 50)
    ]
    # Bob's watch saw none of the 70 changes of Alice's queue, and is not dropped for them.
    await engine.start_conversation(conversation_id="bobs", user_id="bob")
    update = await asyncio.wait_for(anext(bobs), 10)
    assert {c.watched.view.conversation_id for c in update.changes} == {"bobs"}
    for start in starts[10:]:
        start.cancel()
    await asyncio.gather(*starts[10:], return_exceptions=True)
    await bobs.aclose()
    await last.aclose()
