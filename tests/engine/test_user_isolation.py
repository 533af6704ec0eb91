"""A call made for user A can neither see nor touch user B's conversations."""

from __future__ import annotations

import pytest

from convsvc.errors import AlreadyExists, NotFound
from tests.conftest import EngineHarness

HI = {"action": "message", "args": {"content": "hi"}}


@pytest.fixture
async def alice_conversation(engine: EngineHarness) -> EngineHarness:
    await engine.engine.join_conversation(
        conversation_id="alices", connection_id="alice-sock", user_id="alice"
    )
    return engine


async def test_other_users_cannot_read_it(alice_conversation: EngineHarness) -> None:
    engine = alice_conversation.engine
    with pytest.raises(NotFound):
        await engine.queries.get_conversation("alices", user_id="bob")
    with pytest.raises(NotFound):
        await engine.history.search_events(conversation_id="alices", user_id="bob")
    with pytest.raises(NotFound):
        async for _ in engine.history.stream_events(conversation_id="alices", user_id="bob"):
            pass
    assert engine.queries.list_conversations(user_id="bob")[0] == []
    assert engine.queries.list_connections(user_id="bob")[0] == []
    assert [v.conversation_id for v in engine.queries.list_conversations(user_id="alice")[0]] == [
        "alices"
    ]


async def test_other_users_cannot_change_it(alice_conversation: EngineHarness) -> None:
    engine = alice_conversation.engine
    with pytest.raises(NotFound):
        await engine.send_event(conversation_id="alices", user_id="bob", event=HI)
    with pytest.raises(NotFound):
        await engine.send_event(connection_id="alice-sock", user_id="bob", event=HI)
    with pytest.raises(NotFound):
        await engine.close_conversation(conversation_id="alices", user_id="bob")
    with pytest.raises(NotFound):
        await engine.start_conversation(conversation_id="alices", user_id="bob")
    with pytest.raises(NotFound):
        await engine.join_conversation(
            conversation_id="alices", connection_id="bob-sock", user_id="bob"
        )
    assert await engine.disconnect(connection_id="alice-sock", user_id="bob") is False
    view = await engine.queries.get_conversation("alices", user_id="alice")
    assert view.connection_count == 1
    assert view.status.value == "RUNNING" or view.status.value == "STARTING"


async def test_a_stopped_conversation_stays_private(alice_conversation: EngineHarness) -> None:
    engine = alice_conversation.engine
    await engine.close_conversation(conversation_id="alices", user_id="alice")
    with pytest.raises(NotFound) as caught:
        await engine.queries.get_conversation("alices", user_id="bob")
    # indistinguishable from a conversation that never existed
    with pytest.raises(NotFound) as missing:
        await engine.queries.get_conversation("never", user_id="bob")
    assert caught.value.reason == missing.value.reason == "CONVERSATION_NOT_FOUND"


async def test_another_user_cannot_take_over_a_connection(
    alice_conversation: EngineHarness,
) -> None:
    """Issue 8, item 4: joining with someone else's connection id must not move it."""
    engine = alice_conversation.engine
    with pytest.raises(AlreadyExists) as caught:
        await engine.join_conversation(
            conversation_id="bobs", connection_id="alice-sock", user_id="bob"
        )
    assert caught.value.reason == "CONNECTION_ID_TAKEN"
    (connection,) = engine.queries.list_connections()[0]
    assert connection.conversation_id == "alices" and connection.user_id == "alice"
    # Alice's sends by connection, and the web tier's trusted ones, still reach her conversation.
    cid, _ = await engine.send_event(connection_id="alice-sock", user_id="alice", event=HI)
    assert cid == "alices"
    assert (await engine.send_event(connection_id="alice-sock", event=HI))[0] == "alices"
    # Her own user may move it.
    await engine.join_conversation(
        conversation_id="alices-2", connection_id="alice-sock", user_id="alice"
    )
    assert engine.queries.list_connections()[0][0].conversation_id == "alices-2"


async def test_user_scoped_listings_hide_which_web_process_holds_a_connection(
    engine: EngineHarness,
) -> None:
    await engine.engine.join_conversation(
        conversation_id="c", connection_id="s", user_id="alice", client_instance_id="web-1"
    )
    (mine,) = engine.engine.queries.list_connections(user_id="alice")[0]
    assert mine.client_instance_id is None
    (trusted,) = engine.engine.queries.list_connections()[0]
    assert trusted.client_instance_id == "web-1"
