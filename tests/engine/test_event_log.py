"""Ids are gap-free per conversation; a subscriber resumes from any id and gets each later
event exactly once, in order; a slow subscriber is dropped without stalling the others."""

from __future__ import annotations

import asyncio

import pytest

from convsvc.codec import decode_event
from convsvc.domain import StoredEvent
from convsvc.errors import ResourceExhausted
from tests.conftest import EngineHarness
from tests.helpers import echo_of, engine_events_until, ids


def message(text: str) -> dict:
    return {"action": "message", "args": {"content": text}}


async def test_concurrent_sends_get_consecutive_ids(engine: EngineHarness) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    await engine.engine.start_conversation(conversation_id="c2")
    results = await asyncio.gather(
        *(
            engine.engine.send_event(conversation_id=cid, event=message(f"{cid}-{n}"))
            for n in range(50)
            for cid in ("c1", "c2")
        )
    )
    for cid in ("c1", "c2"):
        payloads = await engine_events_until(engine.engine, cid, echo_of(f"{cid}-49"))
        assert ids(payloads) == list(range(len(payloads)))
        sent_ids = sorted(event_id for c, event_id in results if c == cid)
        assert len(set(sent_ids)) == 50
        # each acknowledged id holds the message that was acknowledged with it
        by_id = {p["id"]: p for p in payloads}
        assert all(by_id[i]["source"] == "user" for i in sent_ids)


@pytest.mark.parametrize("start_id", [0, 1, 3, 5])
async def test_resume_from_any_id_gets_each_later_event_once_in_order(
    engine: EngineHarness, start_id: int
) -> None:
    await engine.engine.start_conversation(conversation_id="c1")
    await engine.engine.send_event(conversation_id="c1", event=message("one"))
    everything = await engine_events_until(engine.engine, "c1", echo_of("one"))
    assert len(everything) >= 5

    resumed: list[int] = []

    async def follow() -> None:
        async for batch in engine.engine.history.stream_events(
            conversation_id="c1", start_id=start_id
        ):
            events = [decode_event(item.encoded) for item in batch if isinstance(item, StoredEvent)]
            resumed.extend(event.id for event in events)
            if any(e.source == "agent" and e.payload.get("message") == "two" for e in events):
                return

    follower = asyncio.create_task(follow())
    await engine.engine.send_event(conversation_id="c1", event=message("two"))
    await asyncio.wait_for(follower, 10)
    assert resumed == list(range(start_id, resumed[-1] + 1))


async def test_slow_subscriber_is_dropped_with_a_resume_id_and_others_keep_up(
    make_engine,
) -> None:
    harness: EngineHarness = await make_engine(subscriber_buffer_events=5)
    engine = harness.engine
    await engine.start_conversation(conversation_id="c1")
    await engine_events_until(engine, "c1", lambda p: len(p) >= 2)

    slow = engine.history.stream_events(conversation_id="c1", start_id=0)
    first_batch = await slow.__anext__()  # caught up; then it stops reading
    received = [item.id for item in first_batch if isinstance(item, StoredEvent)]

    for n in range(5):
        await engine.send_event(conversation_id="c1", event=message(f"m{n}"))
    total = 2 + 5 * 4  # loading, awaiting; then per message: itself, running, echo, awaiting
    fast = await engine_events_until(engine, "c1", lambda p: len(p) >= total)  # not stalled

    async def read_until_dropped() -> None:
        async for batch in slow:
            received.extend(item.id for item in batch if isinstance(item, StoredEvent))

    with pytest.raises(ResourceExhausted) as caught:
        await asyncio.wait_for(read_until_dropped(), 10)
    assert caught.value.reason == "SUBSCRIBER_TOO_SLOW"
    resume_from = int(caught.value.metadata["resume_start_id"])
    assert resume_from == received[-1] + 1

    rest = await engine_events_until(
        engine, "c1", lambda p: bool(p) and p[-1]["id"] == total - 1, start_id=resume_from
    )
    assert ids(fast) == list(range(total))
    assert received + ids(rest) == ids(fast)
