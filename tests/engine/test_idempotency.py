"""A mutating call retried with the same request_id takes effect once (AIP-155)."""

from __future__ import annotations

import asyncio

import pytest

from convsvc.errors import AlreadyExists
from tests.conftest import EngineHarness
from tests.helpers import echo_of, engine_events_until

HI = {"action": "message", "args": {"content": "hi"}}


async def test_retried_send_appends_once_and_returns_the_first_answer(
    engine: EngineHarness,
) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    first = await engine.engine.send_event(conversation_id="c1", event=HI, request_id="r1")
    again = await engine.engine.send_event(conversation_id="c1", event=HI, request_id="r1")
    assert again == first
    payloads = await engine_events_until(engine.engine, "c1", echo_of("hi"))
    assert sum(1 for p in payloads if p["source"] == "user") == 1


async def test_concurrent_duplicates_wait_for_the_first(engine: EngineHarness) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    answers = await asyncio.gather(
        *(
            engine.engine.send_event(conversation_id="c1", event=HI, request_id="r1")
            for _ in range(5)
        )
    )
    assert len(set(answers)) == 1


async def test_request_id_survives_a_restart(make_engine, tmp_path) -> None:
    path = tmp_path / "shared.sqlite3"
    first = await make_engine(path=path)
    await first.engine.start_conversation(conversation_id="c1")
    answer = await first.engine.send_event(conversation_id="c1", event=HI, request_id="r1")
    await first.engine.stop()
    await first.store.close()

    second = await make_engine(path=path)
    await second.engine.start_conversation(conversation_id="c1")
    assert await second.engine.send_event(conversation_id="c1", event=HI, request_id="r1") == answer


async def test_reusing_a_request_id_for_another_request_is_refused(engine: EngineHarness) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    await engine.engine.send_event(conversation_id="c1", event=HI, request_id="r1")
    with pytest.raises(AlreadyExists) as caught:
        await engine.engine.send_event(
            conversation_id="c1",
            event={"action": "message", "args": {"content": "other"}},
            request_id="r1",
        )
    assert caught.value.reason == "REQUEST_ID_CONFLICT"


async def test_start_without_id_retried_returns_the_same_conversation(
    engine: EngineHarness,
) -> None:
    first = await engine.engine.start_conversation(user_id="alice", request_id="start-1")
    again = await engine.engine.start_conversation(user_id="alice", request_id="start-1")
    assert again.conversation_id == first.conversation_id
    assert len(engine.engine.queries.list_conversations()[0]) == 1


async def test_request_ids_are_per_user(engine: EngineHarness) -> None:
    a = await engine.engine.start_conversation(user_id="alice", request_id="same")
    b = await engine.engine.start_conversation(user_id="bob", request_id="same")
    assert a.conversation_id != b.conversation_id


async def test_a_reused_request_id_never_hangs_later_calls(engine: EngineHarness) -> None:
    """Issue 8, item 2: after a conflicting reuse, every later call with the id answers."""
    await engine.engine.start_conversation(conversation_id="c1")
    note_a = {"action": "note", "v": "A"}
    first = await engine.engine.send_event(conversation_id="c1", event=note_a, request_id="R")
    with pytest.raises(AlreadyExists):
        await engine.engine.send_event(
            conversation_id="c1", event={"action": "note", "v": "B"}, request_id="R"
        )
    retried = await asyncio.wait_for(
        engine.engine.send_event(conversation_id="c1", event=note_a, request_id="R"), 5
    )
    assert retried == first
    for call in (
        engine.engine.start_conversation(conversation_id="c1", request_id="R"),
        engine.engine.join_conversation(conversation_id="c1", connection_id="k", request_id="R"),
        engine.engine.close_conversation(conversation_id="c1", request_id="R"),
        engine.engine.disconnect(connection_id="k", request_id="R"),
    ):
        with pytest.raises(AlreadyExists):
            await asyncio.wait_for(call, 5)


async def test_a_retry_of_a_call_whose_caller_gave_up_runs_and_answers(
    engine: EngineHarness,
) -> None:
    """The first call is cancelled (its client's deadline) while it holds the request id."""
    await engine.engine.start_conversation(conversation_id="c1")
    first = asyncio.create_task(
        engine.engine.send_event(conversation_id="c1", event=HI, request_id="gave-up")
    )
    await asyncio.sleep(0)  # let it take the request id; no event to wait on inside it
    first.cancel()
    answer = await asyncio.wait_for(
        engine.engine.send_event(conversation_id="c1", event=HI, request_id="gave-up"), 5
    )
    again = await engine.engine.send_event(conversation_id="c1", event=HI, request_id="gave-up")
    assert again == answer
    payloads = await engine_events_until(engine.engine, "c1", echo_of("hi"))
    assert sum(1 for p in payloads if p["source"] == "user") == 1
