"""Start, join, send, disconnect and close keep OpenHands' rules (ARCHITECTURE.md)."""

from __future__ import annotations

import pytest

from convsvc.domain import ConversationStatus
from convsvc.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.conftest import EngineHarness
from tests.helpers import echo_of, engine_events_until

HI = {"action": "message", "args": {"content": "hi"}}


async def test_start_is_idempotent(engine: EngineHarness) -> None:
    first = await engine.engine.start_conversation(conversation_id="c1", user_id="alice")
    again = await engine.engine.start_conversation(conversation_id="c1", user_id="alice")
    assert first.conversation_id == again.conversation_id == "c1"
    listed, _ = engine.engine.queries.list_conversations(user_id="alice")
    assert [v.conversation_id for v in listed] == ["c1"]
    payloads = await engine_events_until(
        engine.engine,
        "c1",
        lambda p: any(e.get("extras", {}).get("agent_state") == "awaiting_user_input" for e in p),
    )
    states = [
        p["extras"]["agent_state"]
        for p in payloads
        if p.get("observation") == "agent_state_changed"
    ]
    assert states == ["loading", "awaiting_user_input"]  # one loop, started once


async def test_start_without_id_assigns_one(engine: EngineHarness) -> None:
    view = await engine.engine.start_conversation(user_id="alice")
    assert len(view.conversation_id) == 32
    assert view.status in (ConversationStatus.STARTING, ConversationStatus.RUNNING)


async def test_initial_message_is_logged_as_user_event_and_echoed(engine: EngineHarness) -> None:
    await engine.engine.start_conversation(conversation_id="c1", initial_user_message=HI)
    payloads = await engine_events_until(engine.engine, "c1", echo_of("hi"))
    user = [p for p in payloads if p["source"] == "user"]
    assert user[0]["action"] == "message" and user[0]["message"] == "hi"
    assert user[0]["args"] == {"content": "hi"}


async def test_replayed_trajectory_sends_its_user_actions_in_order(engine: EngineHarness) -> None:
    trajectory = [
        {"id": 0, "source": "user", "action": "message", "args": {"content": "one"}},
        {"id": 1, "source": "agent", "action": "message", "args": {"content": "ignored"}},
        {"id": 2, "source": "user", "action": "message", "args": {"content": "two"}},
    ]
    await engine.engine.start_conversation(conversation_id="c1", replay_events=trajectory)
    payloads = await engine_events_until(engine.engine, "c1", echo_of("two"))
    echoes = [p["message"] for p in payloads if p["source"] == "agent"]
    assert echoes == ["one", "two"]


async def test_join_starts_a_stopped_loop_and_registers_the_connection(
    engine: EngineHarness,
) -> None:
    await engine.engine.start_conversation(conversation_id="c1", user_id="alice")
    await engine.engine.close_conversation(conversation_id="c1")
    assert (await engine.engine.queries.get_conversation("c1")).status is ConversationStatus.STOPPED

    view, connection = await engine.engine.join_conversation(
        conversation_id="c1", connection_id="sock1", user_id="alice", client_instance_id="web1"
    )
    assert view.status is not ConversationStatus.STOPPED
    assert connection.conversation_id == "c1" and connection.client_instance_id == "web1"
    connections, _ = engine.engine.queries.list_connections(conversation_ids=["c1"])
    assert [c.connection_id for c in connections] == ["sock1"]


async def test_send_by_connection_appends_a_user_event_and_the_agent_answers(
    engine: EngineHarness,
) -> None:
    await engine.engine.join_conversation(conversation_id="c1", connection_id="sock1")
    cid, event_id = await engine.engine.send_event(connection_id="sock1", event=HI)
    assert cid == "c1"
    payloads = await engine_events_until(engine.engine, "c1", echo_of("hi"))
    sent = next(p for p in payloads if p["id"] == event_id)
    assert sent["source"] == "user" and sent["args"]["content"] == "hi"


async def test_send_by_conversation(engine: EngineHarness) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    cid, _ = await engine.engine.send_event(conversation_id="c1", event=HI)
    assert cid == "c1"
    await engine_events_until(engine.engine, "c1", echo_of("hi"))


async def test_send_by_unknown_connection_fails_clearly(engine: EngineHarness) -> None:
    with pytest.raises(NotFound) as caught:
        await engine.engine.send_event(connection_id="nobody", event=HI)
    assert caught.value.reason == "CONNECTION_NOT_FOUND"
    assert "join first" in caught.value.message


async def test_send_to_a_stopped_conversation_fails_clearly(engine: EngineHarness) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    await engine.engine.close_conversation(conversation_id="c1")
    with pytest.raises(FailedPrecondition) as caught:
        await engine.engine.send_event(conversation_id="c1", event=HI)
    assert caught.value.reason == "CONVERSATION_NOT_RUNNING"


async def test_send_needs_exactly_one_target(engine: EngineHarness) -> None:
    with pytest.raises(InvalidArgument):
        await engine.engine.send_event(event=HI)


async def test_disconnect_is_idempotent(engine: EngineHarness) -> None:
    await engine.engine.join_conversation(conversation_id="c1", connection_id="sock1")
    assert await engine.engine.disconnect(connection_id="sock1") is True
    assert await engine.engine.disconnect(connection_id="sock1") is False
    assert engine.engine.queries.list_connections()[0] == []


async def test_close_is_idempotent_reports_stopped_and_drops_connections(
    engine: EngineHarness,
) -> None:
    await engine.engine.join_conversation(conversation_id="c1", connection_id="sock1")
    first = await engine.engine.close_conversation(conversation_id="c1")
    again = await engine.engine.close_conversation(conversation_id="c1")
    assert first.status is again.status is ConversationStatus.STOPPED
    assert engine.engine.queries.list_connections()[0] == []
    assert engine.engine.queries.list_conversations()[0] == []
    payloads = await engine_events_until(
        engine.engine, "c1", lambda p: p[-1].get("extras", {}).get("agent_state") == "stopped"
    )
    stopped = [p for p in payloads if p.get("extras", {}).get("agent_state") == "stopped"]
    assert len(stopped) == 1  # the second close changed nothing


async def test_closed_conversation_restarts_with_its_history(engine: EngineHarness) -> None:
    await engine.engine.start_conversation(conversation_id="c1", initial_user_message=HI)
    await engine_events_until(engine.engine, "c1", echo_of("hi"))
    before = (await engine.engine.queries.get_conversation("c1")).latest_event_id
    await engine.engine.close_conversation(conversation_id="c1")
    await engine.engine.start_conversation(conversation_id="c1")
    await engine.engine.send_event(
        conversation_id="c1", event={"action": "message", "args": {"content": "again"}}
    )
    payloads = await engine_events_until(engine.engine, "c1", echo_of("again"))
    assert [p["id"] for p in payloads] == list(range(len(payloads)))
    assert payloads[-1]["id"] > before + 1
