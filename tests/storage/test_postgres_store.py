"""What only the PostgreSQL store does: leases, fenced appends, the per-user count kept under
a lock, and an unreachable database that the store survives."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from convsvc.storage import LogInterrupted, OwnerMoved, StoreUnavailable
from convsvc.storage.postgres import OwnedElsewhere, PostgresStore
from convsvc.storage.postgres_directory import PostgresDirectory
from convsvc.storage.postgres_schema import migrate
from tests.postgres import PostgresServer
from tests.storage.backends import make_event, make_record

NodeFactory = Callable[[str], Awaitable[PostgresStore]]


@pytest.fixture
async def nodes(postgres_dsn: str) -> AsyncIterator[NodeFactory]:
    """Stores as separate nodes would open them, on one database."""
    opened: list[PostgresStore] = []

    async def open_node(address: str) -> PostgresStore:
        store = PostgresStore(postgres_dsn, node_id=uuid.uuid4().hex, lease_ttl_seconds=2)
        await store.open()
        await PostgresDirectory(store).heartbeat_node(address)
        opened.append(store)
        return store

    yield open_node
    for store in opened:
        await store.close()


async def test_a_claim_fences_off_the_previous_owner_in_the_same_statement(
    nodes: NodeFactory,
) -> None:
    a, b = await nodes("a:1"), await nodes("b:1")
    record = make_record("c1")
    assert (await a.claim(record, address="a:1", limit=10)).epoch == 1
    await a.append_events([make_event("c1", 0)])
    with pytest.raises(OwnedElsewhere) as caught:  # a's heartbeat is fresh
        await b.claim(record, address="b:1", limit=10)
    assert caught.value.owner.address == "a:1"
    await PostgresDirectory(a).leave_cluster()  # as if a's lease expired
    claim = await b.claim(record, address="b:1", limit=10)
    assert claim.epoch == 2 and claim.took_over
    with pytest.raises(OwnerMoved) as moved:
        await a.append_events([make_event("c1", 1)])
    assert moved.value.owner_address == "b:1"
    with pytest.raises(OwnerMoved):  # and the record, too
        await a.save_conversation(record)
    await b.append_events([make_event("c1", 1)])
    assert [e.id for e in await b.read_events("c1", 0)] == [0, 1]


async def test_a_fenced_conversation_does_not_fail_the_others_in_its_batch(
    nodes: NodeFactory,
) -> None:
    a, b = await nodes("a:1"), await nodes("b:1")
    for cid in ("c1", "c2"):
        await a.claim(make_record(cid), address="a:1", limit=10)
    await PostgresDirectory(a).leave_cluster()  # as if a paused past its lease: b takes c1 over
    await b.claim(make_record("c1"), address="b:1", limit=10)
    await PostgresDirectory(a).heartbeat_node("a:1")  # a wakes up, still believing it runs both
    outcomes = await asyncio.gather(
        a.submit_events([make_event("c2", 0)]),
        a.submit_events([make_event("c1", 0)]),
        a.submit_events([make_event("c2", 1)]),
        return_exceptions=True,
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], OwnerMoved)
    assert not a.failed
    assert await a.latest_event_id("c1") == -1 and await a.latest_event_id("c2") == 1


async def test_claims_count_a_users_running_conversations_across_nodes(
    nodes: NodeFactory,
) -> None:
    a, b = await nodes("a:1"), await nodes("b:1")
    await a.claim(make_record("c1", "alice"), address="a:1", limit=2)
    await b.claim(make_record("c2", "alice"), address="b:1", limit=2)
    await b.claim(make_record("other", "bob"), address="b:1", limit=2)
    full = await a.claim(make_record("c3", "alice"), address="a:1", limit=2)
    assert full.epoch is None
    assert [(cid, owner.address) for cid, owner in full.victims] == [("c1", "a:1")]
    assert await a.release("c1", keep_running=False)
    assert (await a.claim(make_record("c3", "alice"), address="a:1", limit=2)).epoch == 1
    running = await b.running_for("alice", "", 10)
    assert [cid for cid, _ in running] == ["c2", "c3"]
    with pytest.raises(OwnerMoved):  # a released c1: its lease is gone
        await a.append_events([make_event("c1", 0)])


async def test_a_handed_over_conversation_is_an_orphan_for_the_other_nodes(
    nodes: NodeFactory,
) -> None:
    a, b = await nodes("a:1"), await nodes("b:1")
    await a.claim(make_record("c1"), address="a:1", limit=10)
    assert await b.orphans(10) == []
    await a.release("c1", keep_running=True)
    assert [r.conversation_id for r in await b.orphans(10)] == ["c1"]
    claim = await b.claim(make_record("c1"), address="b:1", limit=10, take_over=True)
    assert claim.epoch is not None and await b.orphans(10) == []


async def test_an_unreachable_database_fails_writes_it_may_have_lost_then_recovers(
    postgres: PostgresServer, nodes: NodeFactory
) -> None:
    a = await nodes("a:1")
    await a.claim(make_record("c1"), address="a:1", limit=10)
    await a.append_events([make_event("c1", 0)])
    postgres.crash()
    try:
        with pytest.raises(LogInterrupted):
            await a.append_events([make_event("c1", 1)])
        with pytest.raises(StoreUnavailable):
            await a.latest_event_id("c1")
        with pytest.raises(LogInterrupted):  # refused until the log end is read again
            a.submit_events([make_event("c1", 2)])
        with pytest.raises(StoreUnavailable):  # the lease is kept, to be released later
            await a.release("c1", keep_running=False)
    finally:
        postgres.start()
    assert not a.failed  # the store itself goes on
    latest = await a.latest_event_id("c1")
    a.clear_log_failure("c1")
    await a.append_events([make_event("c1", latest + 1)])
    assert [e.id for e in await a.read_events("c1", 0)] == list(range(latest + 2))
    assert await a.release("c1", keep_running=False)  # still held: released now
    assert await a.owner_of("c1") is None


async def test_migrate_applies_each_migration_once(postgres: PostgresServer) -> None:
    dsn = postgres.create_database()
    assert await migrate(dsn) == [
        "0001_cluster.sql",
        "0002_audit.sql",
        "0003_plans_for_stale_statistics.sql",
        "0004_search.sql",
        "0005_webhooks.sql",
        "0006_liveness_locks.sql",
        "0007_provenance.sql",
    ]
    assert await migrate(dsn) == []


async def test_conversations_without_a_user_count_against_each_other(nodes: NodeFactory) -> None:
    a = await nodes("a:1")
    await a.claim(make_record("c1", None), address="a:1", limit=1)
    await a.claim(make_record("mine", "alice"), address="a:1", limit=1)  # another user's
    full = await a.claim(make_record("c2", None), address="a:1", limit=1)
    assert full.epoch is None and [cid for cid, _ in full.victims] == ["c1"]
