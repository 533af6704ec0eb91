"""Starts, evictions, closes, joins and idle cleanup racing on few ids (issue 8, item 1).

Before the lifecycle was serialised, a start could be evicted while it awaited the store and
then launch anyway: the orphaned loop appended with stale ids, a commit hit a UNIQUE
constraint and the whole store stopped taking writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from convsvc.codec import decode_event
from convsvc.domain import StatusUpdate
from convsvc.engine.engine import TOO_MANY_CONVERSATIONS
from convsvc.errors import ConvsvcError
from tests.conftest import EngineHarness
from tests.helpers import lifecycle_tasks, log_violations

HI = {"action": "message", "args": {"content": "hi"}}


async def whole_log(harness: EngineHarness, cid: str) -> list[dict[str, object]]:
    rows = await harness.store.read_events(cid, 0, limit=1_000_000)
    return [decode_event(row.encoded).payload for row in rows]


async def test_concurrent_starts_of_few_ids_under_the_limit_keep_every_log_valid(
    make_engine,
) -> None:
    harness: EngineHarness = await make_engine(max_concurrent_conversations=3)
    engine = harness.engine
    ids = [f"churn-{i}" for i in range(6)]

    async def client(worker: int) -> int:
        done = 0
        for n in range(60):
            await engine.start_conversation(conversation_id=ids[(worker + n) % 6], user_id="u")
            done += 1
        return done

    started = await asyncio.gather(*(client(w) for w in range(8)))
    assert sum(started) == 480
    assert not harness.store.failed
    for cid in ids:
        payloads = await whole_log(harness, cid)
        assert payloads, cid
        assert log_violations(payloads) == [], cid
    running = [v for v in engine.queries.list_conversations(user_id="u")[0]]
    assert len(running) <= 3
    await engine.stop()
    assert lifecycle_tasks() == []


async def test_each_evicted_loop_is_told_once_and_starts_answer_what_is_true(
    make_engine,
) -> None:
    harness: EngineHarness = await make_engine(max_concurrent_conversations=3)
    engine = harness.engine
    ids = [f"new-{i}" for i in range(8)]
    with contextlib.ExitStack() as observing:
        subscriptions = {cid: observing.enter_context(engine.history.live(cid)) for cid in ids}
        views = await asyncio.gather(
            *(engine.start_conversation(conversation_id=cid, user_id="u") for cid in ids)
        )
        told = {
            cid: sum(
                isinstance(item, StatusUpdate) and item.payload.get("id") == TOO_MANY_CONVERSATIONS
                for item in subscription.drain()
            )
            for cid, subscription in subscriptions.items()
        }
    assert not harness.store.failed
    running = {v.conversation_id for v in engine.queries.list_conversations(user_id="u")[0]}
    assert len(running) == 3
    for view in views:
        now = await engine.queries.get_conversation(view.conversation_id)
        # A start answers STARTING or RUNNING only for a loop that was not evicted since.
        if view.conversation_id not in running:
            assert now.status.value == "STOPPED"
    for cid in ids:
        assert told[cid] == (0 if cid in running else 1), cid
        assert log_violations(await whole_log(harness, cid)) == [], cid


async def test_starts_closes_joins_sends_and_cleanup_racing_leave_valid_logs(
    make_engine, clock
) -> None:
    harness: EngineHarness = await make_engine(
        max_concurrent_conversations=2, close_delay_seconds=0.0
    )
    engine = harness.engine
    ids = ["r0", "r1", "r2"]
    rng = random.Random(8)
    refusals: list[str] = []

    async def actor(worker: int) -> None:
        for _ in range(80):
            cid = rng.choice(ids)
            action = rng.randrange(5)
            try:
                if action == 0:
                    await engine.start_conversation(conversation_id=cid, user_id="u")
                elif action == 1:
                    await engine.close_conversation(conversation_id=cid, user_id="u")
                elif action == 2:
                    await engine.join_conversation(
                        conversation_id=cid, connection_id=f"w{worker}", user_id="u"
                    )
                elif action == 3:
                    await engine.send_event(conversation_id=cid, user_id="u", event=HI)
                else:
                    clock.advance(1)
                    await engine.run_cleanup_once()
            except ConvsvcError as exc:
                refusals.append(exc.reason)

    await asyncio.gather(*(actor(w) for w in range(6)))
    # Sends to a loop that is not running, joins racing a close: refusals, and nothing else.
    assert set(refusals) <= {
        "CONVERSATION_NOT_RUNNING",
        "CONVERSATION_NOT_FOUND",
        "CONVERSATION_CLOSED",
    }
    assert not harness.store.failed
    for cid in ids:
        payloads = await whole_log(harness, cid)
        if payloads:
            assert log_violations(payloads) == [], cid
    for connection in engine.queries.list_connections()[0]:
        # No connection on a closed loop.
        assert engine.queries.runs_here(connection.conversation_id)
    await engine.stop()
    assert lifecycle_tasks() == []
