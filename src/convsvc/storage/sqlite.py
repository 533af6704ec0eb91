"""The embedded backend: one SQLite file in WAL mode, written with group commit.

Every write goes through one writer task that takes all writes waiting at that moment and
commits them in a single transaction, so many concurrent appends share one fsync. The writer's
connection lives on a thread of its own and a whole transaction runs there in one hand-off
(measured: a hand-off per statement cost more than the fsync). Reads use a second connection
through aiosqlite, which WAL lets proceed while the writer commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import aiosqlite
import structlog

from convsvc.domain import Notification
from convsvc.metrics import Metrics
from convsvc.storage.base import StorageError
from convsvc.storage.group_commit import GroupCommitStore, PendingWrite, WriteOutcome
from convsvc.storage.outbox import notifications_in
from convsvc.storage.sql import SqlReads, question_marks
from convsvc.storage.sqlite_outbox import OUTBOX_SCHEMA, SqliteOutbox, fan_out

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY,
    user_id TEXT,
    agent TEXT NOT NULL,
    settings TEXT NOT NULL,
    create_time TEXT NOT NULL,
    last_active_time TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    title TEXT NOT NULL DEFAULT '',
    running INTEGER NOT NULL DEFAULT 0,
    agent_state TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    conversation_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    encoded BLOB NOT NULL,
    PRIMARY KEY (conversation_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    credential TEXT NOT NULL,
    subject TEXT NOT NULL,
    token_id TEXT NOT NULL,
    method TEXT NOT NULL,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    affected_token_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_conversation ON audit (conversation_id, sequence);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    token_id TEXT PRIMARY KEY,
    expire_time REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    scope TEXT NOT NULL,
    request_id TEXT NOT NULL,
    method TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result TEXT NOT NULL,
    create_time REAL NOT NULL,
    PRIMARY KEY (scope, request_id)
) WITHOUT ROWID;
"""

# Searches over stored conversations read a page in order of last activity through the
# index of what they filter by: one user's, an agent state, running ones, or a label (a table
# of its own that triggers keep in step with the conversations' labels and activity).
SEARCH_INDEXES = """
CREATE INDEX IF NOT EXISTS conversations_by_activity
    ON conversations (last_active_time DESC, conversation_id DESC);
CREATE INDEX IF NOT EXISTS conversations_by_user_activity
    ON conversations (user_id, last_active_time DESC, conversation_id DESC);
CREATE INDEX IF NOT EXISTS conversations_by_state_activity
    ON conversations (agent_state, last_active_time DESC, conversation_id DESC);
CREATE INDEX IF NOT EXISTS conversations_running_by_activity
    ON conversations (last_active_time DESC, conversation_id DESC) WHERE running;
CREATE TABLE IF NOT EXISTS conversation_labels (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    last_active_time TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    PRIMARY KEY (key, value, last_active_time, conversation_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conversation_labels_of ON conversation_labels (conversation_id);
CREATE TRIGGER IF NOT EXISTS labels_of_new_conversation AFTER INSERT ON conversations
BEGIN
    INSERT INTO conversation_labels (key, value, last_active_time, conversation_id)
    SELECT key, value, NEW.last_active_time, NEW.conversation_id FROM json_each(NEW.labels);
END;
CREATE TRIGGER IF NOT EXISTS labels_replaced AFTER UPDATE OF labels ON conversations
BEGIN
    DELETE FROM conversation_labels WHERE conversation_id = NEW.conversation_id;
    INSERT INTO conversation_labels (key, value, last_active_time, conversation_id)
    SELECT key, value, NEW.last_active_time, NEW.conversation_id FROM json_each(NEW.labels);
END;
CREATE TRIGGER IF NOT EXISTS labels_follow_activity
AFTER UPDATE OF last_active_time ON conversations
WHEN NEW.last_active_time IS NOT OLD.last_active_time AND NEW.labels <> '{}'
BEGIN
    UPDATE conversation_labels SET last_active_time = NEW.last_active_time
    WHERE conversation_id = NEW.conversation_id;
END;
"""
# Columns added since the first release, for files written before them.
_ADDED_COLUMNS = {
    "labels": "TEXT NOT NULL DEFAULT '{}'",
    "title": "TEXT NOT NULL DEFAULT ''",
    "running": "INTEGER NOT NULL DEFAULT 0",
    "agent_state": "TEXT NOT NULL DEFAULT ''",
}

# Labels and title are set when a start creates the conversation; later only
# UpdateConversation changes them (a restart's stale copy never overwrites an update).
_UPSERT_CONVERSATION = """
INSERT INTO conversations (conversation_id, user_id, agent, settings, create_time,
                           last_active_time, labels, title, running)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (conversation_id) DO UPDATE SET
    agent = excluded.agent, settings = excluded.settings,
    last_active_time = excluded.last_active_time, running = excluded.running
"""
_ACTIVITY = """
UPDATE conversations SET last_active_time = max(last_active_time, ?1),
                         agent_state = coalesce(?2, agent_state)
WHERE conversation_id = ?3
"""
_INSERT_EVENT = "INSERT INTO events (conversation_id, id, encoded) VALUES (?, ?, ?)"
_INSERT_AUDIT = """
INSERT INTO audit (time, credential, subject, token_id, method, user_id, conversation_id,
                   connection_id, request_id, code, reason, affected_token_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_REQUEST = """
INSERT OR IGNORE INTO requests (scope, request_id, method, fingerprint, result, create_time)
VALUES (?, ?, ?, ?, ?, ?)
"""

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
T = TypeVar("T")


class _WriterThread:
    """The one thread that uses the writing connection.

    Leaner than an executor: work goes over with one queue put, and the result comes back with
    one ``call_soon_threadsafe`` (measured: the executor's futures cost the event loop more
    than the rest of a commit's bookkeeping).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="sqlite-writer", daemon=True)
        self._thread.start()

    def run(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Runs ``work`` on the thread; the future completes with its outcome."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()
        self._jobs.put((work, outcome, loop))
        return outcome

    def stop(self) -> None:
        """Finishes the work already handed over, then ends the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, outcome, loop = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = work()
            except BaseException as exc:  # handed to the awaiting task, which decides
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, outcome, result, error)


def _settle(outcome: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if outcome.done():  # the awaiting task was cancelled
        return
    if error is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(result)


class _Rows(NamedTuple):
    """One write's rows, table by table, and its events (for the activity they show)."""

    conversations: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]
    requests: list[tuple[Any, ...]]
    audit: list[tuple[Any, ...]]
    notifications: list[Notification]
    activity: dict[str, tuple[datetime, str | None]]


class SqliteStore(SqlReads, GroupCommitStore, SqliteOutbox):
    """ConversationStore on one SQLite file."""

    name = "sqlite"
    label_table = True
    octet_length = "length"  # SQLite 3.43 adds octet_length; Python 3.11 ships 3.40

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        group_commit: bool = True,
        max_batch: int = 1024,
        metrics: Metrics | None = None,
        activity_interval: float = 1.0,
    ) -> None:
        super().__init__(
            max_batch=max_batch if group_commit else 1,
            metrics=metrics,
            activity_interval=activity_interval,
        )
        self._path = path
        self._synchronous = synchronous
        self._writer: sqlite3.Connection | None = None
        self._writer_thread: _WriterThread | None = None
        self._reader: aiosqlite.Connection | None = None
        self.page_token_key = b""
        """A random key made with the store and kept in it, which signs page tokens."""

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_thread = _WriterThread()
        self._writer = await self._on_writer_thread(self._connect_writer)
        self.page_token_key = await self._on_writer_thread(self._load_page_token_key)
        self._reader = await aiosqlite.connect(self._path, isolation_level=None)
        await self._reader.execute("PRAGMA query_only=ON")
        self._start_writer()

    async def close(self) -> None:
        await self._stop_writer()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._writer is not None:
            await self._on_writer_thread(self._writer.close)
            self._writer = None
        if self._writer_thread is not None:
            self._writer_thread.stop()
            self._writer_thread = None

    async def revoke_token(self, token_id: str, expire_time: datetime) -> None:
        writer = self._writer
        assert writer is not None
        await self._on_writer_thread(
            lambda: writer.execute(
                "INSERT OR IGNORE INTO revoked_tokens (token_id, expire_time) VALUES (?, ?)",
                (token_id, expire_time.timestamp()),
            )
        )

    async def describe_conversation(
        self, conversation_id: str, labels: dict[str, str] | None, title: str | None
    ) -> bool:
        writer = self._writer
        assert writer is not None
        cursor = await self._on_writer_thread(
            lambda: writer.execute(
                "UPDATE conversations SET labels = coalesce(?, labels), "
                "title = coalesce(?, title) WHERE conversation_id = ?",
                (None if labels is None else json.dumps(labels), title, conversation_id),
            )
        )
        return bool(cursor.rowcount)

    async def prune_idempotency(self, older_than: datetime) -> int:
        writer = self._writer
        assert writer is not None

        def prune() -> int:
            cursor = writer.execute(
                "DELETE FROM requests WHERE create_time < ?", (older_than.timestamp(),)
            )
            # Revocations outlive their tokens' expiry by nothing: an expired token fails anyway.
            writer.execute("DELETE FROM revoked_tokens WHERE expire_time < ?", (time.time(),))
            return int(cursor.rowcount)

        return await self._on_writer_thread(prune)

    def _labels_match(self, labels: tuple[tuple[str, str], ...], arg: Callable[[Any], str]) -> str:
        # Keys hold no quotes (checked): each becomes a quoted JSON path ("a.b" is one key).
        return " AND ".join(
            f"json_extract(c.labels, {arg(f'$.{json.dumps(key)}')}) = {arg(value)}"
            for key, value in labels
        )

    def _time_arg(self, moment: datetime) -> Any:
        return moment.astimezone(UTC).isoformat()

    def _load_page_token_key(self) -> bytes:
        assert self._writer is not None
        self._writer.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('page_token_key', ?)",
            (secrets.token_bytes(32),),
        )
        row = self._writer.execute("SELECT value FROM meta WHERE key = 'page_token_key'").fetchone()
        return bytes(row[0])

    def _connect_writer(self) -> sqlite3.Connection:
        """Opens the writing connection (on the writer thread, which alone uses it)."""
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.executescript(SCHEMA)
        present = {row[1] for row in conn.execute("PRAGMA table_info(conversations)")}
        for column, definition in _ADDED_COLUMNS.items():
            if column not in present:
                conn.execute(f"ALTER TABLE conversations ADD COLUMN {column} {definition}")
        conn.executescript(SEARCH_INDEXES)
        conn.executescript(OUTBOX_SCHEMA)
        # One process owns the file: nothing it ran before it opened still runs.
        conn.execute("UPDATE conversations SET running = 0 WHERE running")
        return conn

    async def _on_writer_thread(self, work: Callable[[], T]) -> T:
        assert self._writer_thread is not None
        return await self._writer_thread.run(work)

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return await self._read(question_marks(sql), args)

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        if self._reader is None:
            raise StorageError("the store is closed")
        try:
            # Executed and fetched in one go on the reader's thread: a statement left open
            # between hops (while other reads interleave) would hold the connection's read
            # snapshot, and a read could then miss a commit it must see, such as the last
            # event of a log whose next id a start is about to take.
            return list(await self._reader.execute_fetchall(sql, params))
        except aiosqlite.Error as exc:
            raise StorageError(f"reading {self._path.name} failed: {exc}") from exc

    async def _write(self, writes: list[PendingWrite]) -> list[WriteOutcome]:
        writer = self._writer
        assert writer is not None
        rows = [_rows(write) for write in writes]

        def transaction(parts: list[_Rows]) -> None:  # runs on the writer thread
            writer.execute("BEGIN IMMEDIATE")
            try:
                # One statement per table for the whole batch (the rows of all its writes).
                for statement, table in (
                    (_UPSERT_CONVERSATION, "conversations"),
                    (_INSERT_EVENT, "events"),
                    (_INSERT_REQUEST, "requests"),
                    (_INSERT_AUDIT, "audit"),
                ):
                    table_rows: list[tuple[Any, ...]] = [
                        row for part in parts for row in getattr(part, table)
                    ]
                    if table_rows:
                        writer.executemany(statement, table_rows)
                fan_out(writer, [n for part in parts for n in part.notifications])
                touched = {cid: a for part in parts for cid, a in part.activity.items()}
                if touched:
                    writer.executemany(
                        _ACTIVITY,
                        [(t.isoformat(), state, cid) for cid, (t, state) in touched.items()],
                    )
                writer.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    writer.execute("ROLLBACK")
                raise

        def one_by_one() -> list[WriteOutcome]:
            """After a conflict: each write in its own transaction, to find the culprits."""
            outcomes: list[WriteOutcome] = []
            broken: set[str] = set()
            for write, part in zip(writes, rows, strict=True):
                if write.log is not None and write.log in broken:
                    outcomes.append(sqlite3.IntegrityError("an earlier write of this log failed"))
                    continue
                try:
                    transaction([part])
                    outcomes.append(None)
                except sqlite3.IntegrityError as exc:
                    outcomes.append(exc)
                    if write.log is not None:
                        broken.add(write.log)
            return outcomes

        try:
            try:
                await self._on_writer_thread(lambda: transaction(rows))
                return [None] * len(writes)
            except sqlite3.IntegrityError:
                return await self._on_writer_thread(one_by_one)
        except (sqlite3.Error, ValueError) as exc:
            raise StorageError(f"committing to {self._path.name} failed: {exc}") from exc


def _rows(write: PendingWrite) -> _Rows:
    now = time.time()
    return _Rows(
        [
            (
                c.conversation_id,
                c.user_id,
                c.agent,
                json.dumps(c.settings),
                c.create_time.isoformat(),
                c.last_active_time.isoformat(),
                json.dumps(c.labels),
                c.title,
                int(c.running),
            )
            for c in write.conversations
        ],
        [(e.conversation_id, e.id, e.encoded) for e in write.events],
        [
            (r.scope, r.request_id, r.method, r.fingerprint, json.dumps(r.result), now)
            for r in write.requests
        ],
        [
            (
                a.time.isoformat(),
                a.credential,
                a.subject,
                a.token_id,
                a.method,
                a.user_id,
                a.conversation_id,
                a.connection_id,
                a.request_id,
                a.code,
                a.reason,
                a.affected_token_id,
            )
            for a in write.audit
        ],
        [*write.notifications, *([] if write.copied else notifications_in(write.events))],
        write.activity,
    )
