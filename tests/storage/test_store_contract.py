"""The store contract, run against SQLite and a real PostgreSQL: ordered group commit,
durability across reopen, a conflicting write fails its conversation only, byte-bounded
pages, flush barriers, records and idempotency, searches over stored conversations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from convsvc.codec import encode_event
from convsvc.domain import (
    AuditEntry,
    AuditQuery,
    ConversationSearch,
    DeliveryQuery,
    DeliveryState,
    EventKind,
    IdempotencyRecord,
    Notification,
    WebhookEndpoint,
    WebhookEventType,
)
from convsvc.storage import ConversationLogError
from convsvc.storage.postgres import PostgresStore
from convsvc.storage.sqlite import SqliteStore
from tests.storage.backends import StoreFactory, make_event, make_record, own, store_factory


@pytest.fixture(params=["sqlite", "postgres"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    dsn = ""
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres").create_database()
    async for factory in store_factory(request.param, tmp_path, dsn):
        yield factory


async def test_concurrent_appends_share_commits_and_are_reported_in_order(
    stores: StoreFactory,
) -> None:
    store = await stores()
    await own(store, "c1")
    batches: list[list[int]] = []
    store.add_commit_listener(lambda events: batches.append([e.id for e in events]))
    await asyncio.gather(*(store.append_events([make_event("c1", n)]) for n in range(200)))
    assert [i for batch in batches for i in batch] == list(range(200))
    assert len(batches) < 200  # group commit: fewer transactions than writes


async def test_committed_events_and_records_are_read_back_after_reopening(
    stores: StoreFactory,
) -> None:
    store = await stores()
    await own(store, "c1")
    record = make_record("c1")
    await store.save_conversation(record)
    await store.append_events([make_event("c1", n) for n in range(5)])
    await store.close()

    reopened = await stores()
    assert await reopened.latest_event_id("c1") == 4
    assert await reopened.latest_event_id("other") == -1
    assert [r.id for r in await reopened.read_events("c1", 1, 3)] == [1, 2, 3]
    assert [r.id for r in await reopened.read_events("c1", 0, reverse=True, limit=2)] == [4, 3]
    stored = await reopened.get_conversation("c1")
    assert stored is not None and stored.user_id == "u1" and stored.settings == {"k": 1}
    assert await reopened.get_conversation("missing") is None
    assert reopened.page_token_key == store.page_token_key  # shared by every node


async def test_a_conflicting_write_fails_its_conversation_only(stores: StoreFactory) -> None:
    store = await stores()
    await own(store, "c1", "c2")
    committed: list[tuple[str, int]] = []
    store.add_commit_listener(
        lambda events: committed.extend((e.conversation_id, e.id) for e in events)
    )
    await store.append_events([make_event("c1", 0)])
    # One batch: c2's write, a write to c1 whose id is taken, a later c1 write, c2 again.
    outcomes = await asyncio.gather(
        store.submit_events([make_event("c2", 0)]),
        store.submit_events([make_event("c1", 0)]),
        store.submit_events([make_event("c1", 1)]),
        store.submit_events([make_event("c2", 1)]),
        return_exceptions=True,
    )
    assert outcomes[0] is None and outcomes[3] is None
    assert isinstance(outcomes[1], ConversationLogError) and outcomes[1].conversation_id == "c1"
    assert isinstance(outcomes[2], ConversationLogError)  # no gap can follow a lost write
    assert not store.failed
    with pytest.raises(ConversationLogError):
        store.submit_events([make_event("c1", 1)])  # refused until the log end is re-read
    await store.append_events([make_event("c2", 2)])  # other conversations go on
    store.clear_log_failure("c1")
    await store.append_events([make_event("c1", 1)])
    assert committed == [("c1", 0), ("c2", 0), ("c2", 1), ("c2", 2), ("c1", 1)]


async def test_pages_are_bounded_by_bytes(stores: StoreFactory) -> None:
    store = await stores()
    await own(store, "c1")
    await store.append_events([make_event("c1", n) for n in range(10)])
    sizes = [len(e.encoded) for e in await store.read_events("c1", 0)]
    page = await store.read_page("c1", 0, limit=100, max_bytes=sum(sizes[:3]) + sizes[3] - 1)
    assert [e.id for e in page.events] == [0, 1, 2] and page.next_id == 3
    page = await store.read_page("c1", 0, limit=100, max_bytes=1)  # one always fits
    assert [e.id for e in page.events] == [0] and page.next_id == 1
    page = await store.read_page("c1", 3, 9, reverse=True, limit=4, max_bytes=10**6)
    assert [e.id for e in page.events] == [9, 8, 7, 6] and page.next_id == 5
    page = await store.read_page("c1", 8, limit=100, max_bytes=10**6)
    assert [e.id for e in page.events] == [8, 9] and page.next_id is None


async def test_submitted_writes_commit_in_order_and_an_empty_submission_waits_for_them(
    stores: StoreFactory,
) -> None:
    store = await stores()
    await own(store, "c1")
    committed: list[int] = []
    store.add_commit_listener(lambda events: committed.extend(e.id for e in events))
    pending = [store.submit_events([make_event("c1", n)]) for n in range(50)]
    assert not any(future.done() for future in pending)  # queued, not yet durable
    await store.submit_events(())  # a barrier: durable once everything before it is
    assert all(future.done() for future in pending)
    assert committed == list(range(50))
    assert [row.id for row in await store.read_events("c1", 0)] == list(range(50))


async def test_idempotency_records_commit_with_their_events_and_are_pruned(
    stores: StoreFactory,
) -> None:
    store = await stores()
    await own(store, "c1")
    record = IdempotencyRecord("u1", "r1", "SendEvent", "f", {"event_id": 0})
    await store.append_events([make_event("c1", 0)], record)
    assert await store.get_idempotency("u1", "r1") == record
    await store.save_idempotency(IdempotencyRecord("u1", "r2", "Close", "g", {"ok": True}))
    assert (await store.get_idempotency("u1", "r2")) is not None
    assert await store.get_idempotency("u1", "missing") is None
    assert await store.prune_idempotency(datetime.now(UTC) + timedelta(seconds=5)) == 2
    assert await store.get_idempotency("u1", "r1") is None


def audit_entry(method: str, conversation_id: str, user_id: str = "alice") -> AuditEntry:
    return AuditEntry(
        time=datetime.now(UTC),
        credential="token",
        subject=user_id,
        token_id="t1",
        method=method,
        user_id=user_id,
        conversation_id=conversation_id,
        connection_id="",
        request_id=f"r-{method}",
        code="OK",
        reason="",
    )


async def test_audit_entries_commit_in_order_filter_page_and_survive_reopening(
    stores: StoreFactory,
) -> None:
    store = await stores()
    await own(store, "c1")
    store.record_audit(audit_entry("StartConversation", "c1"))
    appended = store.submit_events([make_event("c1", 0)])
    store.record_audit(audit_entry("SendEvent", "c1"))
    store.record_audit(audit_entry("CloseConversation", "c2", user_id="bob"))
    await appended
    await store.submit_events(())  # a barrier: entries recorded before it are durable
    store = await stores()  # reopened
    everything = await store.list_audit(AuditQuery())
    assert [e.method for e in everything] == ["StartConversation", "SendEvent", "CloseConversation"]
    assert [e.sequence for e in everything] == sorted({e.sequence for e in everything})
    assert everything[0].request_id == "r-StartConversation"
    assert everything[0].time.tzinfo is not None
    about_c1 = await store.list_audit(AuditQuery(conversation_id="c1"))
    assert [e.method for e in about_c1] == ["StartConversation", "SendEvent"]
    bobs = await store.list_audit(AuditQuery(user_id="bob"))
    assert [e.method for e in bobs] == ["CloseConversation"]
    after_first = await store.list_audit(AuditQuery(after=everything[0].sequence, limit=1))
    assert [e.method for e in after_first] == ["SendEvent"]


async def test_audit_entries_commit_without_a_write_to_ride_and_at_close(
    stores: StoreFactory,
) -> None:
    store = await stores()
    store.record_audit(audit_entry("MintToken", ""))
    # An idle store commits them by itself (within AUDIT_LINGER_SECONDS); nothing announces
    # a commit without events, so the test reads the store until a deadline.
    async with asyncio.timeout(5):
        while not await store.list_audit(AuditQuery()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    store.record_audit(audit_entry("RevokeToken", ""))
    await store.close()  # the last ones ride the final commit
    reopened = await stores()
    assert [e.method for e in await reopened.list_audit(AuditQuery())] == [
        "MintToken",
        "RevokeToken",
    ]


async def test_revoked_tokens_are_kept_until_they_expire(stores: StoreFactory) -> None:
    store = await stores()
    await store.revoke_token("t-live", datetime.now(UTC) + timedelta(hours=1))
    await store.revoke_token("t-live", datetime.now(UTC) + timedelta(hours=1))  # idempotent
    await store.revoke_token("t-past", datetime.now(UTC) - timedelta(seconds=1))
    store = await stores()  # reopened
    assert await store.token_revoked("t-live")
    assert not await store.token_revoked("t-other")
    await store.prune_idempotency(datetime.now(UTC))
    assert await store.token_revoked("t-live")
    assert not await store.token_revoked("t-past")  # expired: the token fails anyway


async def test_stored_conversations_are_searched_by_every_filter_newest_activity_first(
    stores: StoreFactory,
) -> None:
    store = await stores()
    base = datetime(2026, 1, 1, tzinfo=UTC)
    described = {
        "a": ("u1", {"team": "red", "env": "prod"}, "Deploy the API"),
        "b": ("u1", {"team": "red"}, "Fix the login bug"),
        "c": ("u2", {"team": "blue", "env": "prod"}, "deploy docs"),
        "d": ("u1", {}, ""),
    }
    for n, (cid, (user, labels, title)) in enumerate(described.items()):
        record = make_record(cid, user)
        record.create_time = record.last_active_time = base + timedelta(minutes=n)
        record.labels, record.title, record.running = labels, title, cid != "d"
        if isinstance(store, PostgresStore):
            await store.claim(record, address="test", limit=10**6)
        await store.save_conversation(record)
    # A commit keeps each conversation's last activity and agent state current: "b" is now
    # the newest, its agent waits for the user.
    state = make_event("b", 0)
    state.kind, state.name = EventKind.OBSERVATION, "agent_state_changed"
    state.payload = {"observation": "agent_state_changed", "extras": {"agent_state": "paused"}}
    state.timestamp = base + timedelta(hours=1)
    state.encoded = encode_event(state)
    await store.append_events([state])

    async def ids(**filters: Any) -> list[str]:
        found = await store.search_conversations(ConversationSearch(**filters))
        return [f.record.conversation_id for f in found]

    assert await ids() == ["b", "d", "c", "a"]
    assert await ids(user_id="u1") == ["b", "d", "a"]
    assert await ids(labels=(("team", "red"),)) == ["b", "a"]
    assert await ids(labels=(("env", "prod"), ("team", "red"))) == ["a"]
    assert await ids(title_contains="DEPLOY") == ["c", "a"]
    assert await ids(agent_states=frozenset({"paused"})) == ["b"]
    assert await ids(agents=frozenset({"echo"}), limit=2) == ["b", "d"]
    assert await ids(created_after=base + timedelta(minutes=2)) == ["d", "c"]
    assert await ids(active_before=base + timedelta(minutes=2)) == ["a"]
    assert await ids(conversation_ids=frozenset({"a", "d"})) == ["d", "a"]
    if isinstance(store, SqliteStore):  # PostgreSQL's running flag is the cluster's lease
        assert await ids(running=False) == ["d"]
    # Keyset paging: the page after "d" (by its activity and id).
    found = await store.search_conversations(ConversationSearch(limit=2))
    last = found[-1].record
    after = await ids(after=(last.last_active_time, last.conversation_id))
    assert after == ["c", "a"]
    [b] = await store.search_conversations(ConversationSearch(conversation_ids=frozenset("b")))
    assert (b.agent_state, b.latest_event_id, b.record.labels) == ("paused", 0, {"team": "red"})

    assert await store.describe_conversation("b", {"team": "green"}, None)
    assert not await store.describe_conversation("missing", {}, "x")
    await store.close()
    reopened = await stores()
    stored = await reopened.get_conversation("b")
    assert stored is not None
    assert (stored.labels, stored.title) == ({"team": "green"}, "Fix the login bug")


async def test_the_webhook_outbox_is_filled_by_commits_leased_once_and_listed(
    stores: StoreFactory,
) -> None:
    store = await stores()
    now = datetime.now(UTC)
    everything = WebhookEndpoint("wh-all", "https://a.example/", (), "whsec_x", "", now)
    closes = WebhookEndpoint(
        "wh-closed", "https://b.example/", (WebhookEventType.CLOSED,), "whsec_y", "", now
    )
    for endpoint in (everything, closes):
        await store.save_webhook(endpoint)
    await own(store, "c1")
    finished = make_event("c1", 0)
    finished.kind, finished.name = EventKind.OBSERVATION, "agent_state_changed"
    finished.payload = {"observation": "agent_state_changed", "extras": {"agent_state": "finished"}}
    finished.encoded = encode_event(finished)
    await store.append_events([finished])  # notifies FINISHED: the endpoint for all types
    record = make_record("c1")
    await store.save_conversation(
        record, notifications=[Notification(WebhookEventType.CLOSED, "c1", "u1", now)]
    )  # notifies CLOSED: both endpoints
    claimed = await store.claim_deliveries("node-a", 10, 60.0)
    assert sorted((d.webhook_id, d.type.value) for d, _ in claimed) == [
        ("wh-all", "conversation.closed"),
        ("wh-all", "conversation.finished"),
        ("wh-closed", "conversation.closed"),
    ]
    assert await store.claim_deliveries("node-b", 10, 60.0) == []  # leased: sent once
    first, endpoint = claimed[0]
    assert endpoint.secret in ("whsec_x", "whsec_y")
    await store.finish_attempt(first.delivery_id, "node-b", DeliveryState.DELIVERED, 200, "", None)
    await store.finish_attempt(first.delivery_id, "node-a", DeliveryState.DELIVERED, 200, "", None)
    later = now + timedelta(hours=1)
    for delivery, _ in claimed[1:]:
        await store.finish_attempt(
            delivery.delivery_id, "node-a", DeliveryState.PENDING, 500, "x", later
        )
    listed = await store.list_deliveries(DeliveryQuery(limit=10))
    by_id = {d.delivery_id: d for d in listed}
    assert by_id[first.delivery_id].state is DeliveryState.DELIVERED  # node-b held no lease
    assert by_id[first.delivery_id].attempts == 1
    assert [
        d.state
        for d in await store.list_deliveries(
            DeliveryQuery(states=frozenset({DeliveryState.PENDING}), limit=10)
        )
    ] == [DeliveryState.PENDING] * 2
    page = await store.list_deliveries(DeliveryQuery(limit=2))
    rest = await store.list_deliveries(
        DeliveryQuery(limit=2, after=(page[-1].create_time, page[-1].delivery_id))
    )
    assert len({d.delivery_id for d in page + rest}) == 3
    assert await store.delete_webhook("wh-closed")
    assert not await store.delete_webhook("wh-closed")
    dead = await store.list_deliveries(DeliveryQuery(webhook_id="wh-closed", limit=10))
    assert {d.state for d in dead} == {DeliveryState.DEAD}
    assert [w.webhook_id for w in await store.list_webhooks()] == ["wh-all"]


async def test_activity_is_stored_at_most_once_an_interval_and_never_lost(
    stores: StoreFactory,
) -> None:
    store = await stores(activity_interval=0.5)
    await own(store, "c1")
    await store.save_conversation(make_record("c1"))
    state = make_event("c1", 0)
    state.kind, state.name = EventKind.OBSERVATION, "agent_state_changed"
    state.payload = {"observation": "agent_state_changed", "extras": {"agent_state": "running"}}
    state.encoded = encode_event(state)
    await store.append_events([state])  # the first activity is stored with its commit

    async def stored() -> tuple[datetime, str]:
        [found] = await store.search_conversations(ConversationSearch())
        return found.record.last_active_time, found.agent_state

    first_time, first_state = await stored()
    assert first_state == "running"
    later = make_event("c1", 1)
    await store.append_events([later])  # within the interval: held back
    assert await stored() == (first_time, "running")
    await asyncio.sleep(0.6)  # the interval is a time: the held-back activity is due after it
    await store.append_events([])  # a barrier behind the timer's commit
    assert (await stored())[0] == later.timestamp
    # Held-back activity also rides the last commit when the store closes.
    await store.append_events([make_event("c1", 2)])
    await store.close()
    reopened = await stores()
    [found] = await reopened.search_conversations(ConversationSearch())
    assert found.latest_event_id == 2 and found.record.last_active_time > later.timestamp
