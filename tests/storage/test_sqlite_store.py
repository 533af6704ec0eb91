"""What only the SQLite store does (the shared contract is in test_store_contract): WAL, commits
without grouping, and a failed commit stops all writes."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from convsvc.domain import Event
from convsvc.storage import ConversationLogError, StorageError
from convsvc.storage.sqlite import SqliteStore
from tests.storage.backends import make_event


async def test_without_group_commit_each_write_commits_alone(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3", group_commit=False)
    batches: list[Sequence[Event]] = []
    store.add_commit_listener(batches.append)
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
