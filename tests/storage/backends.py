"""Both store backends behind one factory, so the contract tests run against each."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convsvc.codec import encode_event
from convsvc.domain import ConversationRecord, Event, EventKind
from convsvc.storage.group_commit import GroupCommitStore
from convsvc.storage.postgres import PostgresStore
from convsvc.storage.postgres_directory import PostgresDirectory
from convsvc.storage.sqlite import SqliteStore


def make_event(cid: str, event_id: int, size: int = 0) -> Event:
    event = Event(
        cid,
        event_id,
        datetime.now(UTC),
        "user",
        EventKind.ACTION,
        "message",
        {"id": event_id, "action": "message", "args": {"content": str(event_id) + "x" * size}},
    )
    event.encoded = encode_event(event)
    return event


def make_record(cid: str, user: str | None = "u1") -> ConversationRecord:
    now = datetime.now(UTC)
    return ConversationRecord(cid, user, "echo", {"k": 1}, now, now)


async def own(store: GroupCommitStore, *cids: str, user: str | None = "u1") -> None:
    """Makes the store's node the owner of these conversations (a no-op on SQLite)."""
    if isinstance(store, PostgresStore):
        for cid in cids:
            claim = await store.claim(make_record(cid, user), address="test", limit=10**6)
            assert claim.epoch is not None


StoreFactory = Callable[..., Awaitable[Any]]


async def store_factory(backend: str, tmp_path: Path, dsn: str) -> AsyncIterator[StoreFactory]:
    """Opens stores of ``backend`` on one database (a second call reopens the same data)."""
    opened: list[Any] = []

    async def make(**options: Any) -> Any:
        store: Any
        if backend == "sqlite":
            store = SqliteStore(tmp_path / "db.sqlite3", **options)
        else:
            store = PostgresStore(dsn, node_id=uuid.uuid4().hex, **options)
        await store.open()
        if isinstance(store, PostgresStore):
            await PostgresDirectory(store).heartbeat_node("test")
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
