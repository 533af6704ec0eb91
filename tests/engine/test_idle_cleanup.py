"""Idle loops close; connections of a client instance that stops heart-beating expire."""

from __future__ import annotations

import asyncio

from convsvc.agents import EchoAgent
from convsvc.domain import ConversationStatus
from tests.conftest import EngineHarness
from tests.helpers import (
    BusyAgent,
    agent_state_is,
    engine_events_until,
    engine_reports,
    settled,
)


async def status(engine: EngineHarness, cid: str) -> ConversationStatus:
    return (await engine.engine.queries.get_conversation(cid)).status


async def test_idle_loop_without_connections_is_closed_after_close_delay(
    make_engine, clock
) -> None:
    harness: EngineHarness = await make_engine(close_delay_seconds=15)
    await harness.engine.start_conversation(conversation_id="c1")
    await settled(harness.engine, "c1")

    clock.advance(14)
    await harness.engine.run_cleanup_once()
    assert await status(harness, "c1") is ConversationStatus.RUNNING

    clock.advance(2)
    await harness.engine.run_cleanup_once()
    assert await status(harness, "c1") is ConversationStatus.STOPPED


async def test_a_connection_keeps_an_idle_loop_open(make_engine, clock) -> None:
    harness: EngineHarness = await make_engine(close_delay_seconds=15, connection_ttl_seconds=3600)
    await harness.engine.join_conversation(conversation_id="c1", connection_id="s1")
    await settled(harness.engine, "c1")
    clock.advance(100)
    await harness.engine.run_cleanup_once()
    assert await status(harness, "c1") is ConversationStatus.RUNNING

    await harness.engine.disconnect(connection_id="s1")
    clock.advance(16)
    await harness.engine.run_cleanup_once()
    assert await status(harness, "c1") is ConversationStatus.STOPPED


async def test_a_running_agent_is_not_closed_however_long_it_runs(make_engine, clock) -> None:
    BusyAgent.release = asyncio.Event()
    harness: EngineHarness = await make_engine(
        close_delay_seconds=15, agents={"busy": BusyAgent, "echo": EchoAgent}, default_agent="busy"
    )
    await harness.engine.start_conversation(conversation_id="c1")
    await harness.engine.send_event(
        conversation_id="c1", event={"action": "message", "args": {"content": "work"}}
    )
    await engine_events_until(harness.engine, "c1", agent_state_is("running"))
    await engine_reports(harness.engine, "c1", "running")
    clock.advance(1000)
    await harness.engine.run_cleanup_once()
    assert await status(harness, "c1") is ConversationStatus.RUNNING
    BusyAgent.release.set()


async def test_connections_of_a_silent_client_instance_expire(make_engine, clock) -> None:
    harness: EngineHarness = await make_engine(connection_ttl_seconds=30, close_delay_seconds=3600)
    engine = harness.engine
    await engine.join_conversation(
        conversation_id="c1", connection_id="a", client_instance_id="web1"
    )
    await engine.join_conversation(
        conversation_id="c1", connection_id="b", client_instance_id="web2"
    )
    await engine.join_conversation(conversation_id="c1", connection_id="c")  # no instance

    clock.advance(20)
    assert engine.queries.heartbeat("web2") == (1, 30)
    clock.advance(20)  # web1 silent for 40 s, web2 for 20 s
    await engine.run_cleanup_once()

    remaining = sorted(c.connection_id for c in engine.queries.list_connections()[0])
    assert remaining == ["b", "c"]
