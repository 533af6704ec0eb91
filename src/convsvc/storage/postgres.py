"""The clustered backend: PostgreSQL through asyncpg, shared by every node of a cluster.

Writes use the same group commit as SQLite (``group_commit``): one transaction per batch, one
statement for all of its events, one WAL flush. Each append is fenced in that statement: its
rows are inserted only while the conversation's ``lease_epoch`` is still the one its writer
claimed, read under a share lock so that a claim by another node waits for the append or
fences it, never interleaves with it. Events are stored in the same encoding as SQLite's.

Beside the store interface it keeps the leases: which node runs each conversation, under
which epoch (see ``convsvc.cluster``). The rest of the cluster's shared state (nodes,
connections, client instances) is ``postgres_directory``'s.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import structlog

from convsvc.domain import ConversationRecord
from convsvc.metrics import Metrics
from convsvc.storage.base import OwnerMoved, StorageError, StoreUnavailable
from convsvc.storage.group_commit import GroupCommitStore, PendingWrite, WriteOutcome
from convsvc.storage.outbox import notifications_in
from convsvc.storage.postgres_outbox import PostgresOutbox, fan_out
from convsvc.storage.postgres_schema import UNREACHABLE, migrate_pool, unavailable
from convsvc.storage.sql import (
    CONVERSATION_COLUMNS,
    SqlReads,
    conversation_record,
    page_filters,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

RELEASE_SECONDS = 5.0
"""How long a pooled connection may take to be made ready for reuse before it is dropped."""
REVOCATIONS_CHANNEL = "convsvc_revocations"
"""Where a revocation is announced to every node (PostgreSQL LISTEN/NOTIFY)."""

# The fenced append: rows go in only for conversations whose epoch is still the writer's.
_FENCED_INSERT = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bigint[])
        AS b(conversation_id, id, encoded, epoch)
), leased AS (
    SELECT c.conversation_id FROM conversations c
    WHERE (c.conversation_id, c.lease_epoch) IN (SELECT conversation_id, epoch FROM batch)
    FOR SHARE
)
INSERT INTO events (conversation_id, id, encoded, epoch, writer)
SELECT b.conversation_id, b.id, b.encoded, b.epoch, $5::text FROM batch b
WHERE b.conversation_id IN (SELECT conversation_id FROM leased)
RETURNING conversation_id
"""
_FENCED_RECORD_UPDATE = """
UPDATE conversations c
SET agent = u.agent, settings = u.settings, last_active_time = u.last_active_time
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bigint[])
    AS u(conversation_id, agent, settings, last_active_time, epoch)
WHERE c.conversation_id = u.conversation_id AND c.lease_epoch = u.epoch
RETURNING c.conversation_id
"""
# What a commit keeps current on its conversations' rows (for SearchConversations).
_ACTIVITY = """
UPDATE conversations c
SET last_active_time = greatest(c.last_active_time, u.last_active_time),
    agent_state = coalesce(u.agent_state, c.agent_state)
FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS u(conversation_id, last_active_time,
                                                           agent_state)
WHERE c.conversation_id = u.conversation_id
"""
_INSERT_AUDIT = """
INSERT INTO audit (time, credential, subject, token_id, method, user_id, conversation_id,
                   connection_id, request_id, code, reason, affected_token_id, entry_id)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
                     $12::text[], $13::text[])
ON CONFLICT (entry_id) DO NOTHING
"""
_INSERT_REQUESTS = """
INSERT INTO requests (scope, request_id, method, fingerprint, result)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
ON CONFLICT DO NOTHING
"""
# An owner is alive while its node's heartbeat is younger than the lease TTL (database clock).
OWNER_ALIVE = """
EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = c.owner_node
        AND n.heartbeat_at > now() - make_interval(secs => $TTL))
"""


def same_user(user_id: str | None) -> str:
    """The condition on ``c.user_id = $1``: "=" (or IS NULL), not IS NOT DISTINCT FROM,
    which no index serves."""
    return "c.user_id = $1" if user_id is not None else "$1::text IS NULL AND c.user_id IS NULL"


# Queries whose plan must not depend on fresh statistics (see migration 0003; a test checks
# their plans while the statistics say nothing runs).
OWNER_OF = f"""
SELECT c.running, c.owner_node, c.owner_address, {OWNER_ALIVE} AS alive
FROM conversations c WHERE c.conversation_id = $1
"""
"""By primary key alone, whatever the statistics say about running conversations."""
RUNNING_OF_USER = """
SELECT count(*) FROM conversations c
WHERE c.running AND {same_user} AND c.conversation_id <> $2
"""
OLDEST_OF_USER = f"""
SELECT c.conversation_id, c.owner_node, c.owner_address, {OWNER_ALIVE} AS alive
FROM conversations c WHERE c.running AND {{same_user}} AND c.conversation_id <> $2
ORDER BY c.last_active_time, c.conversation_id LIMIT $3
"""
STOP_ORPHAN = f"""
UPDATE conversations c SET running = false, owner_node = NULL, owner_address = NULL,
    lease_epoch = c.lease_epoch + 1
WHERE c.conversation_id = $1 AND c.running AND (c.owner_node IS NULL OR NOT {OWNER_ALIVE})
"""
WITHOUT_OWNER = f"""
SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE running AND owner_node IS NULL LIMIT $1
"""
OWNED_BY = f"""
SELECT {CONVERSATION_COLUMNS} FROM conversations
WHERE running AND owner_node = ANY($1::text[]) LIMIT $2
"""


@dataclass(slots=True, frozen=True)
class Owner:
    """Who holds a running conversation's lease (``node_id`` None: nobody yet)."""

    node_id: str | None
    address: str | None
    alive: bool


@dataclass(slots=True, frozen=True)
class Claim:
    """The outcome of claiming a conversation: its epoch, or the running conversations that
    must stop first for the user to stay within the limit (oldest first)."""

    epoch: int | None
    victims: list[tuple[str, Owner]]
    took_over: bool = False


class OwnedElsewhere(Exception):
    """A live node owns the conversation."""

    def __init__(self, owner: Owner) -> None:
        super().__init__(f"owned by {owner.address}")
        self.owner = owner


class PostgresStore(SqlReads, GroupCommitStore, PostgresOutbox):
    """ConversationStore and leases on PostgreSQL."""

    name = "postgres"
    find_text = "strpos"

    def __init__(
        self,
        dsn: str,
        *,
        password: str | None = None,
        node_id: str,
        lease_ttl_seconds: float = 10.0,
        pool_size: int = 8,
        max_batch: int = 1024,
        group_commit: bool = True,
        metrics: Metrics | None = None,
        activity_interval: float = 1.0,
    ) -> None:
        super().__init__(
            max_batch=max_batch if group_commit else 1,
            metrics=metrics,
            activity_interval=activity_interval,
        )
        self._dsn = dsn
        self._password = password
        self.node_id = node_id
        self._ttl = lease_ttl_seconds
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._epochs: dict[str, int] = {}
        self.page_token_key = b""
        self.leases_valid_until: float | None = None
        """When (time.monotonic) this node's leases may run out, as far as it knows: one TTL
        after its last heartbeat that the database confirmed was sent. None: not tracked."""
        self.heartbeats_failing = False
        """Whether the node's heartbeats fail now (the database is out of its reach)."""

    # -- connecting, schema ----------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                password=self._password,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=30,
                # A node cut off in the middle of a transaction leaves it open on the server,
                # holding its row locks (a takeover's claim waits on them) until the server
                # notices the connection is dead, which under a partition can take hours.
                # The server ends such a transaction after half a lease: a node never waits
                # that long between two statements of one.
                server_settings={
                    "idle_in_transaction_session_timeout": str(max(1, int(self._ttl * 500)))
                },
            )
        except UNREACHABLE as exc:
            raise unavailable(exc) from exc
        except asyncpg.PostgresError as exc:  # e.g. a wrong password, a missing database
            raise StorageError(f"the database refused the connection: {exc}") from exc
        await migrate_pool(self._pool)
        self.page_token_key = await self.run(self._load_page_token_key)
        self._start_writer()

    async def close(self) -> None:
        await self._stop_writer()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _load_page_token_key(self, conn: asyncpg.Connection) -> bytes:
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('page_token_key', $1) ON CONFLICT DO NOTHING",
            secrets.token_bytes(32),
        )
        return bytes(await conn.fetchval("SELECT value FROM meta WHERE key = 'page_token_key'"))

    async def run(
        self, work: Callable[[asyncpg.Connection], Awaitable[T]], *, heartbeat: bool = False
    ) -> T:
        """Runs ``work`` on a pooled connection; an unreachable database is StoreUnavailable.

        While the node's heartbeats fail (a partition: nothing is refused, everything waits),
        work waits at most until its leases may have run out, and after that is refused at
        once: callers get an answer, not their deadline. Heartbeats are always tried."""
        if self._pool is None:
            raise StorageError("the store is closed")
        patience = None if heartbeat else self._patience()
        try:
            async with asyncio.timeout(patience):
                conn = await self._pool.acquire()
                try:
                    return await work(conn)
                finally:
                    # A connection whose query was cancelled keeps its slot until the
                    # cancel request reaches the server, which under a partition is never:
                    # the pool would run dry. Cut off, such a connection is dropped at once.
                    budget = 0.1 if self.heartbeats_failing else RELEASE_SECONDS
                    await self._pool.release(conn, timeout=budget)
        except UNREACHABLE as exc:
            raise unavailable(exc) from exc

    def _patience(self) -> float | None:
        if not self.heartbeats_failing or self.leases_valid_until is None:
            return None
        left = self.leases_valid_until - time.monotonic()
        if left <= 0:
            raise StoreUnavailable(
                "no heartbeat of this node has reached the database for longer than the "
                "lease: other nodes may be running its conversations now, and it waits for "
                "the database to confirm a heartbeat before it uses it again"
            )
        return left

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return await self.fetch(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of a query (``$TTL`` stands for the lease TTL)."""
        return await self.run(lambda conn: conn.fetch(self.sql(sql), *args))

    def _labels_match(self, labels: tuple[tuple[str, str], ...], arg: Callable[[Any], str]) -> str:
        return f"c.labels @> {arg(json.dumps(dict(labels)))}::jsonb"

    def sql(self, sql: str) -> str:
        """A query with ``$TTL`` replaced by the lease TTL in seconds."""
        return sql.replace("$TTL", f"{float(self._ttl)}::double precision")

    # -- writes ----------------------------------------------------------------------------

    def _stamp(self, write: PendingWrite) -> None:
        target = write.target
        if target is not None:
            write.epoch = self._epochs.get(target, -1)  # no claim held: fenced off

    async def _write(self, writes: list[PendingWrite]) -> list[WriteOutcome]:
        # A commit still waiting when the leases it writes under may have run out is given
        # up (its outcome unknown, as after any lost connection): the callers behind it
        # get an answer instead of waiting on a database that is out of reach.
        patience = None
        if self.leases_valid_until is not None:
            patience = max(self.leases_valid_until - time.monotonic(), 1.0)
        try:
            async with asyncio.timeout(patience):
                return await self.run(lambda conn: self._transaction(conn, writes))
        except TimeoutError:
            raise StoreUnavailable(
                "a commit did not finish while this node's leases were sure to hold"
            ) from None
        except asyncpg.UniqueViolationError:
            # A log already holds one of these ids: each write alone, to find which.
            outcomes: list[WriteOutcome] = []
            broken: set[str] = set()
            for write in writes:
                if write.log is not None and write.log in broken:
                    outcomes.append(StorageError("an earlier write of this log failed"))
                    continue
                try:
                    outcomes.extend(
                        await self.run(functools.partial(self._transaction, writes=[write]))
                    )
                except asyncpg.UniqueViolationError as exc:
                    outcomes.append(exc)
                    if write.log is not None:
                        broken.add(write.log)
            return outcomes
        except asyncpg.PostgresError as exc:
            # The database refused the batch for a reason of its own (out of disk, ...):
            # nothing of it committed, and later batches may succeed.
            raise StoreUnavailable(f"the database refused a commit: {exc}") from exc

    async def _transaction(
        self, conn: asyncpg.Connection, writes: list[PendingWrite]
    ) -> list[WriteOutcome]:
        events = [(e, w.epoch) for w in writes for e in w.events]
        records = [(r, w.epoch) for w in writes for r in w.conversations]
        async with conn.transaction():
            fenced: set[str] = set()
            if events:
                inserted = await conn.fetch(
                    _FENCED_INSERT,
                    [e.conversation_id for e, _ in events],
                    [e.id for e, _ in events],
                    [e.encoded for e, _ in events],
                    [epoch for _, epoch in events],
                    self.node_id,
                )
                kept = {row[0] for row in inserted}
                fenced |= {e.conversation_id for e, _ in events} - kept
            if records:
                updated = await conn.fetch(
                    _FENCED_RECORD_UPDATE,
                    [r.conversation_id for r, _ in records],
                    [r.agent for r, _ in records],
                    [json.dumps(r.settings) for r, _ in records],
                    [r.last_active_time for r, _ in records],
                    [epoch for _, epoch in records],
                )
                fenced |= {r.conversation_id for r, _ in records} - {row[0] for row in updated}
            await fan_out(
                conn,
                [
                    n
                    for w in writes
                    if w.target is None or w.target not in fenced
                    for n in (
                        *w.notifications,
                        *([] if w.copied else notifications_in(w.events)),
                    )
                ],
            )
            touched = {cid: a for w in writes for cid, a in w.activity.items()}
            if touched:
                await conn.execute(
                    _ACTIVITY,
                    list(touched),
                    [t for t, _ in touched.values()],
                    [state for _, state in touched.values()],
                )
            requests = [
                r for w in writes if w.target is None or w.target not in fenced for r in w.requests
            ]
            if requests:
                await conn.execute(
                    _INSERT_REQUESTS,
                    [r.scope for r in requests],
                    [r.request_id for r in requests],
                    [r.method for r in requests],
                    [r.fingerprint for r in requests],
                    [json.dumps(r.result) for r in requests],
                )
            audit = [a for w in writes for a in w.audit]
            if audit:
                await conn.execute(
                    _INSERT_AUDIT,
                    *(
                        [getattr(a, column) for a in audit]
                        for column in (
                            "time",
                            "credential",
                            "subject",
                            "token_id",
                            "method",
                            "user_id",
                            "conversation_id",
                            "connection_id",
                            "request_id",
                            "code",
                            "reason",
                            "affected_token_id",
                            "entry_id",
                        )
                    ),
                )
            owners: dict[str, str | None] = {}
            if fenced:
                rows = await conn.fetch(
                    "SELECT conversation_id, owner_address FROM conversations "
                    "WHERE conversation_id = ANY($1::text[])",
                    list(fenced),
                )
                owners = {row[0]: row[1] for row in rows}
        outcomes: list[WriteOutcome] = []
        for write in writes:
            target = write.target
            if target is not None and target in fenced:
                self._epochs.pop(target, None)
                outcomes.append(OwnerMoved(target, owners.get(target)))
            else:
                outcomes.append(None)
        return outcomes

    # -- reads -----------------------------------------------------------------------------

    async def prune_idempotency(self, older_than: datetime) -> int:
        status = await self.run(
            lambda conn: conn.execute("DELETE FROM requests WHERE create_time < $1", older_than)
        )
        await self.run(
            lambda conn: conn.execute("DELETE FROM revoked_tokens WHERE expire_time < now()")
        )
        return int(status.split()[-1])

    async def revoke_token(self, token_id: str, expire_time: datetime) -> None:
        """Records the revocation and tells every node listening (``listen``) in the same
        transaction."""

        async def work(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO revoked_tokens (token_id, expire_time) VALUES ($1, $2) "
                    "ON CONFLICT DO NOTHING",
                    token_id,
                    expire_time,
                )
                await conn.execute("SELECT pg_notify($1, $2)", REVOCATIONS_CHANNEL, token_id)

        await self.run(work)

    async def revoked_among(self, token_ids: Sequence[str]) -> set[str]:
        """Which of these tokens are revoked."""
        if not token_ids:
            return set()
        rows = await self.fetch(
            "SELECT token_id FROM revoked_tokens WHERE token_id = ANY($1::text[])",
            list(token_ids),
        )
        return {row[0] for row in rows}

    async def listen(self, channel: str, told: Callable[[str], None]) -> asyncpg.Connection:
        """A connection of its own (not the pool's) that calls ``told(payload)`` for every
        notification on ``channel``; close it to stop."""
        conn = await self.dedicated_connection()
        await conn.add_listener(channel, lambda _conn, _pid, _channel, payload: told(payload))
        return conn

    async def dedicated_connection(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool, for session state (listeners, locks)."""
        try:
            conn: asyncpg.Connection = await asyncpg.connect(self._dsn, password=self._password)
        except UNREACHABLE as exc:
            raise unavailable(exc) from exc
        return conn

    # -- leases ------------------------------------------------------------------------------

    def epoch_of(self, conversation_id: str) -> int | None:
        """The epoch this node holds for a conversation, if it holds its lease."""
        return self._epochs.get(conversation_id)

    async def claim(
        self, record: ConversationRecord, *, address: str, limit: int, take_over: bool = False
    ) -> Claim:
        """Makes this node the conversation's owner (a new epoch), creating its record.

        Serialised per user (an advisory lock), a conversation that is not yet running counts
        against the user's limit: when the limit is reached, nothing is claimed and the
        running ones that must stop first are returned instead. Raises OwnedElsewhere when a
        live node owns it (``take_over`` claims only when the owner is gone).
        """

        async def work(conn: asyncpg.Connection) -> Claim:
            cid = record.conversation_id
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    record.user_id or "",
                )
                row = await conn.fetchrow(
                    self.sql(
                        "SELECT c.running, c.owner_node, c.owner_address, c.lease_epoch, "
                        f"{OWNER_ALIVE} AS alive FROM conversations c "
                        "WHERE c.conversation_id = $1 FOR UPDATE"
                    ),
                    cid,
                )
                running = bool(row and row["running"])
                if running and row is not None and row["owner_node"] is not None:
                    owner = Owner(row["owner_node"], row["owner_address"], bool(row["alive"]))
                    if owner.node_id != self.node_id and owner.alive:
                        raise OwnedElsewhere(owner)
                if take_over and not running:
                    return Claim(None, [])
                if not running:
                    user = same_user(record.user_id)
                    count = await conn.fetchval(
                        RUNNING_OF_USER.format(same_user=user), record.user_id, cid
                    )
                    excess = int(count) - limit + 1
                    if excess > 0:
                        oldest = await conn.fetch(
                            self.sql(OLDEST_OF_USER.format(same_user=user)),
                            record.user_id,
                            cid,
                            excess,
                        )
                        return Claim(None, [(o[0], Owner(o[1], o[2], bool(o[3]))) for o in oldest])
                epoch = await conn.fetchval(
                    "INSERT INTO conversations AS c (conversation_id, user_id, agent, settings, "
                    "create_time, last_active_time, running, owner_node, owner_address, "
                    "lease_epoch, labels, title) "
                    "VALUES ($1, $2, $3, $4, $5, $6, true, $7, $8, 1, $9::jsonb, $10) "
                    "ON CONFLICT (conversation_id) DO UPDATE SET running = true, "
                    "owner_node = excluded.owner_node, owner_address = excluded.owner_address, "
                    "agent = excluded.agent, settings = excluded.settings, "
                    "last_active_time = excluded.last_active_time, "
                    "lease_epoch = c.lease_epoch + 1 RETURNING lease_epoch",
                    cid,
                    record.user_id,
                    record.agent,
                    json.dumps(record.settings),
                    record.create_time,
                    record.last_active_time,
                    self.node_id,
                    address,
                    json.dumps(record.labels),
                    record.title,
                )
            self._epochs[cid] = int(epoch)
            return Claim(int(epoch), [], took_over=running)

        return await self.run(work)

    async def describe_conversation(
        self, conversation_id: str, labels: dict[str, str] | None, title: str | None
    ) -> bool:
        status = await self.run(
            lambda conn: conn.execute(
                "UPDATE conversations SET labels = coalesce($2::jsonb, labels), "
                "title = coalesce($3, title) WHERE conversation_id = $1",
                conversation_id,
                None if labels is None else json.dumps(labels),
                title,
            )
        )
        return str(status) != "UPDATE 0"

    async def release(self, conversation_id: str, *, keep_running: bool) -> bool:
        """Gives up this node's lease (a new epoch fences any write still in flight).

        ``keep_running``: another node should take it over at once (drain, lost log);
        otherwise it is stopped. False when the lease had already moved on.
        """
        epoch = self._epochs.get(conversation_id)
        if epoch is None:
            return False
        status = await self.run(
            lambda conn: conn.execute(
                "UPDATE conversations SET running = $3, owner_node = NULL, "
                "owner_address = NULL, lease_epoch = lease_epoch + 1 "
                "WHERE conversation_id = $1 AND lease_epoch = $2",
                conversation_id,
                epoch,
                keep_running,
            )
        )
        # Forgotten only once released: a release that failed can be tried again.
        self._epochs.pop(conversation_id, None)
        return str(status).endswith(" 1")

    async def stop_orphan(self, conversation_id: str) -> None:
        """Stops a running conversation whose owner is gone (nobody can log ``stopped``)."""
        await self.run(
            lambda conn: conn.execute(
                self.sql(STOP_ORPHAN),
                conversation_id,
            )
        )

    def forget_lease(self, conversation_id: str) -> None:
        """Drops a lease this node learned it lost (its writes are fenced anyway)."""
        self._epochs.pop(conversation_id, None)

    async def owner_of(self, conversation_id: str) -> Owner | None:
        """The owner of a running conversation, or None when it is not running."""
        rows = await self.run(lambda conn: conn.fetch(self.sql(OWNER_OF), conversation_id))
        if not rows or not rows[0][0]:
            return None
        return Owner(rows[0][1], rows[0][2], bool(rows[0][3]))

    async def orphans(self, limit: int) -> list[ConversationRecord]:
        """Running conversations whose owner is gone (or that were handed off)."""

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            dead = [
                row[0]
                for row in await conn.fetch(
                    self.sql(
                        "SELECT node_id FROM nodes WHERE node_id <> $1 "
                        "AND heartbeat_at <= now() - make_interval(secs => $TTL)"
                    ),
                    self.node_id,
                )
            ]
            # Two lookups, each on its own partial index (an OR of them would scan).
            rows = list(await conn.fetch(WITHOUT_OWNER, limit))
            if dead and len(rows) < limit:
                rows += await conn.fetch(OWNED_BY, dead, limit - len(rows))
            return rows

        return [conversation_record(row) for row in await self.run(work)]

    async def running_for(
        self, user_id: str | None, after: str, limit: int, wanted: Sequence[str] = ()
    ) -> list[tuple[str, Owner]]:
        """Running conversations (of one user, or all with ``user_id`` None), by id."""
        where, args = page_filters("c.conversation_id", after, limit, user_id, wanted)
        where.append("c.running")
        rows = await self.run(
            lambda conn: conn.fetch(
                self.sql(
                    f"SELECT c.conversation_id, c.owner_node, c.owner_address, {OWNER_ALIVE} "
                    f"FROM conversations c WHERE {' AND '.join(where)} "
                    "ORDER BY c.conversation_id LIMIT $2"
                ),
                *args,
            )
        )
        return [(row[0], Owner(row[1], row[2], bool(row[3]))) for row in rows]
