"""The clustered backend: PostgreSQL through asyncpg, shared by every node of a cluster.

Writes use the same group commit as SQLite (``group_commit``): one transaction per batch, one
statement for all of its events, one WAL flush. Each append is fenced in that statement: its
rows are inserted only while the conversation's ``lease_epoch`` is still the one its writer
claimed, read under a share lock so that a claim by another node waits for the append or
fences it, never interleaves with it. Events are stored in the same encoding as SQLite's.

Beside the store interface it keeps the cluster's shared state: leases, the node registry,
the directory of connections and client-instance heartbeats (see ``convsvc.cluster``).
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

import asyncpg
import structlog

from convsvc.domain import (
    AuditEntry,
    AuditQuery,
    Connection,
    ConversationRecord,
    IdempotencyRecord,
    StoredEvent,
)
from convsvc.storage.base import (
    EventPage,
    OwnerMoved,
    StorageError,
    StoreUnavailable,
    plan_page,
)
from convsvc.storage.group_commit import GroupCommitStore, PendingWrite, WriteOutcome

log = structlog.get_logger(__name__)

T = TypeVar("T")

_MIGRATIONS_LOCK = 0x636F6E76  # any constant: one migrator at a time across the cluster

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
INSERT INTO events (conversation_id, id, encoded)
SELECT b.conversation_id, b.id, b.encoded FROM batch b
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
_INSERT_AUDIT = """
INSERT INTO audit (time, credential, subject, token_id, method, user_id, conversation_id,
                   connection_id, request_id, code, reason, affected_token_id)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
                     $12::text[])
"""
_AUDIT_COLUMNS = (
    "sequence, time, credential, subject, token_id, method, user_id, conversation_id, "
    "connection_id, request_id, code, reason, affected_token_id"
)
_INSERT_REQUESTS = """
INSERT INTO requests (scope, request_id, method, fingerprint, result)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
ON CONFLICT DO NOTHING
"""
# An owner is alive while its node's heartbeat is younger than the lease TTL (database clock).
_OWNER_ALIVE = """
EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = c.owner_node
        AND n.heartbeat_at > now() - make_interval(secs => $TTL))
"""
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


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


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the database is unreachable ({type(exc).__name__}: {exc})")


class PostgresStore(GroupCommitStore):
    """ConversationStore, leases and cluster state on PostgreSQL."""

    name = "postgres"

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
    ) -> None:
        super().__init__(max_batch=max_batch if group_commit else 1)
        self._dsn = dsn
        self._password = password
        self.node_id = node_id
        self._ttl = lease_ttl_seconds
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._epochs: dict[str, int] = {}
        self.page_token_key = b""

    # -- connecting, schema ----------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                password=self._password,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=30,
            )
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc
        except asyncpg.PostgresError as exc:  # e.g. a wrong password, a missing database
            raise StorageError(f"the database refused the connection: {exc}") from exc
        await migrate_pool(self._pool)
        self.page_token_key = await self._run(self._load_page_token_key)
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

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Runs ``work`` on a pooled connection; an unreachable database is StoreUnavailable."""
        if self._pool is None:
            raise StorageError("the store is closed")
        try:
            async with self._pool.acquire() as conn:
                return await work(conn)
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(self._sql(sql), *args))

    def _sql(self, sql: str) -> str:
        return sql.replace("$TTL", f"{float(self._ttl)}::double precision")

    # -- writes ----------------------------------------------------------------------------

    def _stamp(self, write: PendingWrite) -> None:
        target = write.target
        if target is not None:
            write.epoch = self._epochs.get(target, -1)  # no claim held: fenced off

    async def _write(self, writes: list[PendingWrite]) -> list[WriteOutcome]:
        try:
            return await self._run(lambda conn: self._transaction(conn, writes))
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
                        await self._run(functools.partial(self._transaction, writes=[write]))
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

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        rows = await self._fetch(
            "SELECT conversation_id, user_id, agent, settings, create_time, last_active_time "
            "FROM conversations WHERE conversation_id = $1",
            conversation_id,
        )
        return _record(rows[0]) if rows else None

    async def latest_event_id(self, conversation_id: str) -> int:
        rows = await self._fetch(
            "SELECT max(id) FROM events WHERE conversation_id = $1", conversation_id
        )
        latest = rows[0][0] if rows else None
        return -1 if latest is None else int(latest)

    async def read_events(
        self,
        conversation_id: str,
        start_id: int,
        end_id: int | None = None,
        *,
        reverse: bool = False,
        limit: int = 100,
    ) -> list[StoredEvent]:
        order = "DESC" if reverse else "ASC"
        rows = await self._fetch(
            "SELECT id, encoded FROM events WHERE conversation_id = $1 AND id >= $2 AND id <= $3 "
            f"ORDER BY id {order} LIMIT $4",
            conversation_id,
            start_id,
            end_id if end_id is not None else 2**63 - 1,
            limit,
        )
        return [StoredEvent(id=row[0], encoded=bytes(row[1])) for row in rows]

    async def read_page(
        self,
        conversation_id: str,
        start_id: int,
        end_id: int | None = None,
        *,
        reverse: bool = False,
        limit: int,
        max_bytes: int,
    ) -> EventPage:
        order = "DESC" if reverse else "ASC"
        high = end_id if end_id is not None else 2**63 - 1
        # octet_length() reads no TOASTed value.
        sizes = await self._fetch(
            "SELECT id, octet_length(encoded) FROM events "
            "WHERE conversation_id = $1 AND id >= $2 AND id <= $3 "
            f"ORDER BY id {order} LIMIT $4",
            conversation_id,
            start_id,
            high,
            limit + 1,
        )
        span, next_id = plan_page([(row[0], row[1]) for row in sizes], limit, max_bytes, reverse)
        if span is None:
            return EventPage([], next_id)
        rows = await self._fetch(
            "SELECT id, encoded FROM events WHERE conversation_id = $1 AND id >= $2 AND id <= $3 "
            f"ORDER BY id {order}",
            conversation_id,
            *span,
        )
        return EventPage([StoredEvent(id=row[0], encoded=bytes(row[1])) for row in rows], next_id)

    async def get_idempotency(self, scope: str, request_id: str) -> IdempotencyRecord | None:
        rows = await self._fetch(
            "SELECT method, fingerprint, result FROM requests WHERE scope = $1 AND request_id = $2",
            scope,
            request_id,
        )
        if not rows:
            return None
        method, fingerprint, result = rows[0]
        return IdempotencyRecord(scope, request_id, method, fingerprint, json.loads(result))

    async def prune_idempotency(self, older_than: datetime) -> int:
        status = await self._run(
            lambda conn: conn.execute("DELETE FROM requests WHERE create_time < $1", older_than)
        )
        await self._run(
            lambda conn: conn.execute("DELETE FROM revoked_tokens WHERE expire_time < now()")
        )
        return int(status.split()[-1])

    async def list_audit(self, query: AuditQuery) -> list[AuditEntry]:
        rows = await self._fetch(
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE sequence > $1 "
            "AND ($2 = '' OR conversation_id = $2) AND ($3 = '' OR user_id = $3 OR subject = $3) "
            "ORDER BY sequence LIMIT $4",
            query.after,
            query.conversation_id,
            query.user_id,
            query.limit,
        )
        return [AuditEntry(**dict(row)) for row in rows]

    async def revoke_token(self, token_id: str, expire_time: datetime) -> None:
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO revoked_tokens (token_id, expire_time) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                token_id,
                expire_time,
            )
        )

    async def token_revoked(self, token_id: str) -> bool:
        rows = await self._fetch("SELECT 1 FROM revoked_tokens WHERE token_id = $1", token_id)
        return bool(rows)

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
                    self._sql(
                        "SELECT c.running, c.owner_node, c.owner_address, c.lease_epoch, "
                        f"{_OWNER_ALIVE} AS alive FROM conversations c "
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
                    # "= $1" (or IS NULL), not IS NOT DISTINCT FROM: only these use the index.
                    same_user = (
                        "c.user_id = $1"
                        if record.user_id is not None
                        else "$1::text IS NULL AND c.user_id IS NULL"
                    )
                    count = await conn.fetchval(
                        f"SELECT count(*) FROM conversations c WHERE c.running AND {same_user} "
                        "AND c.conversation_id <> $2",
                        record.user_id,
                        cid,
                    )
                    excess = int(count) - limit + 1
                    if excess > 0:
                        oldest = await conn.fetch(
                            self._sql(
                                "SELECT c.conversation_id, c.owner_node, c.owner_address, "
                                f"{_OWNER_ALIVE} AS alive FROM conversations c "
                                f"WHERE c.running AND {same_user} "
                                "AND c.conversation_id <> $2 ORDER BY c.last_active_time, "
                                "c.conversation_id LIMIT $3"
                            ),
                            record.user_id,
                            cid,
                            excess,
                        )
                        return Claim(None, [(o[0], Owner(o[1], o[2], bool(o[3]))) for o in oldest])
                epoch = await conn.fetchval(
                    "INSERT INTO conversations AS c (conversation_id, user_id, agent, settings, "
                    "create_time, last_active_time, running, owner_node, owner_address, "
                    "lease_epoch) VALUES ($1, $2, $3, $4, $5, $6, true, $7, $8, 1) "
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
                )
            self._epochs[cid] = int(epoch)
            return Claim(int(epoch), [], took_over=running)

        return await self._run(work)

    async def release(self, conversation_id: str, *, keep_running: bool) -> bool:
        """Gives up this node's lease (a new epoch fences any write still in flight).

        ``keep_running``: another node should take it over at once (drain, lost log);
        otherwise it is stopped. False when the lease had already moved on.
        """
        epoch = self._epochs.get(conversation_id)
        if epoch is None:
            return False
        status = await self._run(
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
        await self._run(
            lambda conn: conn.execute(
                self._sql(
                    "UPDATE conversations c SET running = false, owner_node = NULL, "
                    "owner_address = NULL, lease_epoch = c.lease_epoch + 1 "
                    "WHERE c.conversation_id = $1 AND c.running "
                    f"AND (c.owner_node IS NULL OR NOT {_OWNER_ALIVE})"
                ),
                conversation_id,
            )
        )

    def forget_lease(self, conversation_id: str) -> None:
        """Drops a lease this node learned it lost (its writes are fenced anyway)."""
        self._epochs.pop(conversation_id, None)

    async def owner_of(self, conversation_id: str) -> Owner | None:
        """The owner of a running conversation, or None when it is not running."""
        rows = await self._run(
            lambda conn: conn.fetch(
                self._sql(
                    f"SELECT c.owner_node, c.owner_address, {_OWNER_ALIVE} AS alive "
                    "FROM conversations c WHERE c.conversation_id = $1 AND c.running"
                ),
                conversation_id,
            )
        )
        if not rows:
            return None
        return Owner(rows[0][0], rows[0][1], bool(rows[0][2]))

    async def orphans(self, limit: int) -> list[ConversationRecord]:
        """Running conversations whose owner is gone (or that were handed off)."""
        columns = (
            "SELECT conversation_id, user_id, agent, settings, create_time, last_active_time "
            "FROM conversations WHERE running AND "
        )

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            dead = [
                row[0]
                for row in await conn.fetch(
                    self._sql(
                        "SELECT node_id FROM nodes WHERE node_id <> $1 "
                        "AND heartbeat_at <= now() - make_interval(secs => $TTL)"
                    ),
                    self.node_id,
                )
            ]
            # Two lookups of the partial index on owner_node (an OR of them would scan).
            rows = list(await conn.fetch(columns + "owner_node IS NULL LIMIT $1", limit))
            if dead and len(rows) < limit:
                rows += await conn.fetch(
                    columns + "owner_node = ANY($1::text[]) LIMIT $2", dead, limit - len(rows)
                )
            return rows

        return [_record(row) for row in await self._run(work)]

    async def running_for(
        self, user_id: str | None, after: str, limit: int, wanted: Sequence[str] = ()
    ) -> list[tuple[str, Owner]]:
        """Running conversations (of one user, or all with ``user_id`` None), by id."""
        where, args = _page_filters("c.conversation_id", after, limit, user_id, wanted)
        where.append("c.running")
        rows = await self._run(
            lambda conn: conn.fetch(
                self._sql(
                    f"SELECT c.conversation_id, c.owner_node, c.owner_address, {_OWNER_ALIVE} "
                    f"FROM conversations c WHERE {' AND '.join(where)} "
                    "ORDER BY c.conversation_id LIMIT $2"
                ),
                *args,
            )
        )
        return [(row[0], Owner(row[1], row[2], bool(row[3]))) for row in rows]

    # -- nodes ----------------------------------------------------------------------------

    async def heartbeat_node(self, address: str, agent_kinds: Sequence[str] = ()) -> None:
        """Registers this node or renews its heartbeat (and so all of its leases), with the
        agent kinds its workers have room for."""
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO nodes (node_id, address, heartbeat_at, agent_kinds) "
                "VALUES ($1, $2, now(), $3) ON CONFLICT (node_id) DO UPDATE SET "
                "heartbeat_at = now(), address = excluded.address, "
                "agent_kinds = excluded.agent_kinds",
                self.node_id,
                address,
                list(agent_kinds),
            )
        )

    async def nodes_running(self, agent_kind: str) -> list[tuple[str, str]]:
        """(node id, address) of live nodes whose workers have room for ``agent_kind``."""
        rows = await self._fetch(
            "SELECT node_id, address FROM nodes WHERE $1 = ANY(agent_kinds) "
            "AND heartbeat_at > now() - make_interval(secs => $TTL) ORDER BY random()",
            agent_kind,
        )
        return [(row[0], row[1]) for row in rows]

    async def leave_cluster(self) -> None:
        """Removes this node's row: what it still owns is taken over at once."""
        await self._run(
            lambda conn: conn.execute(
                "UPDATE nodes SET heartbeat_at = '-infinity' WHERE node_id = $1", self.node_id
            )
        )

    async def live_nodes(self) -> list[tuple[str, str]]:
        """(node id, address) of every node whose heartbeat is fresh, this one included."""
        rows = await self._run(
            lambda conn: conn.fetch(
                self._sql(
                    "SELECT node_id, address FROM nodes "
                    "WHERE heartbeat_at > now() - make_interval(secs => $TTL) ORDER BY node_id"
                )
            )
        )
        return [(row[0], row[1]) for row in rows]

    # -- connections and client instances -------------------------------------------------

    async def put_connection(self, connection: Connection) -> None:
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO connections (connection_id, conversation_id, user_id, "
                "client_instance_id) VALUES ($1, $2, $3, $4) ON CONFLICT (connection_id) DO "
                "UPDATE SET conversation_id = excluded.conversation_id, "
                "user_id = excluded.user_id, client_instance_id = excluded.client_instance_id",
                connection.connection_id,
                connection.conversation_id,
                connection.user_id,
                connection.client_instance_id,
            )
        )

    async def drop_connections(self, connection_ids: Sequence[str]) -> None:
        if connection_ids:
            await self._run(
                lambda conn: conn.execute(
                    "DELETE FROM connections WHERE connection_id = ANY($1::text[])",
                    list(connection_ids),
                )
            )

    async def find_connection(self, connection_id: str) -> Connection | None:
        rows = await self._fetch(
            "SELECT connection_id, conversation_id, user_id, client_instance_id "
            "FROM connections WHERE connection_id = $1",
            connection_id,
        )
        return Connection(*rows[0]) if rows else None

    async def connections_of(self, conversation_id: str) -> list[Connection]:
        rows = await self._fetch(
            "SELECT connection_id, conversation_id, user_id, client_instance_id "
            "FROM connections WHERE conversation_id = $1",
            conversation_id,
        )
        return [Connection(*row) for row in rows]

    async def list_connections(
        self, user_id: str | None, after: str, limit: int, wanted: Sequence[str] = ()
    ) -> list[Connection]:
        where, args = _page_filters("connection_id", after, limit, user_id, wanted)
        rows = await self._fetch(
            "SELECT connection_id, conversation_id, user_id, client_instance_id FROM connections "
            f"WHERE {' AND '.join(where)} ORDER BY connection_id LIMIT $2",
            *args,
        )
        return [Connection(*row) for row in rows]

    async def touch_instance(self, client_instance_id: str) -> int:
        """Records an instance's heartbeat; returns how many connections it holds."""

        async def work(conn: asyncpg.Connection) -> int:
            await conn.execute(
                "INSERT INTO client_instances (client_instance_id, seen_at) VALUES ($1, now()) "
                "ON CONFLICT (client_instance_id) DO UPDATE SET seen_at = now()",
                client_instance_id,
            )
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM connections WHERE client_instance_id = $1",
                    client_instance_id,
                )
            )

        return await self._run(work)

    async def instances_seen_within(self, instance_ids: Sequence[str], seconds: float) -> set[str]:
        """Which of these instances heartbeated some node in the last ``seconds``."""
        if not instance_ids:
            return set()
        rows = await self._fetch(
            "SELECT client_instance_id FROM client_instances "
            "WHERE client_instance_id = ANY($1::text[]) "
            "AND seen_at > now() - make_interval(secs => $2)",
            list(instance_ids),
            float(seconds),
        )
        return {row[0] for row in rows}


def _page_filters(
    key: str, after: str, limit: int, user_id: str | None, wanted: Sequence[str]
) -> tuple[list[str], list[Any]]:
    """WHERE clauses and arguments of a page ordered by ``key`` ($1: after, $2: limit),
    of one user's rows and of the wanted conversations, when given."""
    table = key.split(".", 1)[0] + "." if "." in key else ""
    where = [f"{key} > $1"]
    args: list[Any] = [after, limit]
    if user_id is not None:
        args.append(user_id)
        where.append(f"{table}user_id = ${len(args)}")
    if wanted:
        args.append(list(wanted))
        where.append(f"{table}conversation_id = ANY(${len(args)}::text[])")
    return where, args


def _record(row: asyncpg.Record) -> ConversationRecord:
    cid, user_id, agent, settings, create_time, last_active_time = row
    return ConversationRecord(
        conversation_id=cid,
        user_id=user_id,
        agent=agent,
        settings=json.loads(settings),
        create_time=create_time,
        last_active_time=last_active_time,
    )


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every migration shipped, in order."""
    found = []
    for entry in resources.files("convsvc.storage.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate_pool(pool: asyncpg.Pool) -> list[str]:
    """Applies the migrations this database lacks, one migrator at a time; returns their
    names."""
    applied: list[str] = []
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATIONS_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migrations():
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
                applied.append(name)
                log.info("postgres.migrated", migration=name)
    except _UNREACHABLE as exc:
        raise _unavailable(exc) from exc
    return applied


async def migrate(dsn: str, password: str | None = None) -> list[str]:
    """``convsvc migrate``: brings a database's schema up to date."""
    try:
        pool = await asyncpg.create_pool(dsn, password=password, min_size=1, max_size=1)
    except _UNREACHABLE as exc:
        raise _unavailable(exc) from exc
    except asyncpg.PostgresError as exc:
        raise StorageError(f"the database refused the connection: {exc}") from exc
    try:
        return await migrate_pool(pool)
    finally:
        await pool.close()
