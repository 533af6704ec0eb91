"""The SQLite store: group commit, durability across reopen, and a failed commit stops writes."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from convsvc.codec import encode_event
from convsvc.domain import Event, EventKind
from convsvc.storage import ConversationLogError, StorageError
from convsvc.storage.sqlite import SqliteStore


def make_event(cid: str, event_id: int) -> Event:
    event = Event(
        cid,
        event_id,
        datetime.now(UTC),
        "user",
        EventKind.ACTION,
        "message",
        {"id": event_id, "action": "message", "args": {"content": str(event_id)}},
    )
    event.encoded = encode_event(event)
    return event


async def test_concurrent_appends_share_commits_and_are_reported_in_order(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    batches: list[list[int]] = []
    store.set_commit_listener(lambda events: batches.append([e.id for e in events]))
    await store.open()
    await asyncio.gather(*(store.append_events([make_event("c1", n)]) for n in range(200)))
    await store.close()
    assert [i for batch in batches for i in batch] == list(range(200))
    assert len(batches) < 200  # group commit: fewer transactions than writes


async def test_without_group_commit_each_write_commits_alone(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3", group_commit=False)
    batches: list[Sequence[Event]] = []
    store.set_commit_listener(batches.append)
    await store.open()
    await asyncio.gather(*(store.append_events([make_event("c1", n)]) for n in range(20)))
    await store.close()
    assert len(batches) == 20


async def test_committed_events_are_read_back_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteStore(path)
    await store.open()
    await store.append_events([make_event("c1", n) for n in range(5)])
    await store.close()

    reopened = SqliteStore(path)
    await reopened.open()
    assert await reopened.latest_event_id("c1") == 4
    assert await reopened.latest_event_id("other") == -1
    rows = await reopened.read_events("c1", 1, 3)
    assert [r.id for r in rows] == [1, 2, 3]
    rows = await reopened.read_events("c1", 0, reverse=True, limit=2)
    assert [r.id for r in rows] == [4, 3]
    await reopened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_conflicting_write_fails_its_conversation_only(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    committed: list[tuple[str, int]] = []
    store.set_commit_listener(
        lambda events: committed.extend((e.conversation_id, e.id) for e in events)
    )
    await store.open()
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
    await store.close()


async def test_a_failure_of_the_store_itself_refuses_all_later_writes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    await store.open()
    await store.append_events([make_event("c1", 0)])
    with sqlite3.connect(tmp_path / "db.sqlite3") as other:
        other.execute("DROP TABLE events")  # as a broken disk would: nothing can be written
    with pytest.raises(StorageError) as caught:
        await store.append_events([make_event("c2", 0)])
    assert not isinstance(caught.value, ConversationLogError)
    assert store.failed
    with pytest.raises(StorageError):
        store.submit_events([make_event("c3", 0)])
    await store.close()


async def test_pages_are_bounded_by_bytes_and_never_load_what_they_leave_out(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    await store.open()
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
    await store.close()


async def test_submitted_writes_commit_in_order_and_an_empty_submission_waits_for_them(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    committed: list[int] = []
    store.set_commit_listener(lambda events: committed.extend(e.id for e in events))
    await store.open()
    pending = [store.submit_events([make_event("c1", n)]) for n in range(50)]
    assert not any(future.done() for future in pending)  # queued, not yet durable
    await store.submit_events(())  # a barrier: durable once everything before it is
    assert all(future.done() for future in pending)
    assert committed == list(range(50))
    assert [row.id for row in await store.read_events("c1", 0)] == list(range(50))
    await store.close()


async def test_a_failed_store_refuses_submissions_at_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    await store.open()
    await store.append_events([make_event("c1", 0)])
    doomed = store.submit_events([make_event("c1", 0)])
    with pytest.raises(StorageError):
        await doomed
    with pytest.raises(StorageError):
        store.submit_events([make_event("c1", 1)])  # raised before anything is queued
    await store.close()
