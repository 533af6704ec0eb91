"""The cluster's shared directory in PostgreSQL: the nodes (their addresses, heartbeats, the
agent kinds their workers have room for, and the liveness locks that tell a crashed node
from a silent one), which connection watches which conversation, and the client instances'
heartbeats. Any node can answer from it; ``convsvc.cluster`` keeps
it current.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence

import asyncpg
import structlog

from convsvc.domain import Connection, NodeView
from convsvc.storage.base import StorageError
from convsvc.storage.postgres import PostgresStore
from convsvc.storage.sql import page_filters

log = structlog.get_logger(__name__)

LIVENESS_LOCK_CLASS = 1129270851
"""The advisory lock namespace (classid) of nodes' liveness locks (see migration 0006)."""


class PostgresDirectory:
    """Nodes, connections and client instances, on the store's database."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self.lock_key = secrets.randbelow(2**31 - 2) + 1
        """This node's liveness lock (objid; classid is LIVENESS_LOCK_CLASS)."""
        self._lock_connection: asyncpg.Connection | None = None

    @property
    def holds_liveness_lock(self) -> bool:
        conn = self._lock_connection
        return conn is not None and not conn.is_closed()

    async def hold_liveness_lock(self) -> bool:
        """Takes this node's liveness lock on a session of its own, unless it holds it: the
        lock lasts as long as this process's connection, and peers read a crashed node's
        death from its release. False when the database cannot be reached now."""
        if self.holds_liveness_lock:
            try:  # the session may be gone without the socket knowing yet
                assert self._lock_connection is not None
                await self._lock_connection.fetchval("SELECT 1", timeout=5)
                return True
            except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
                log.warning("cluster.liveness_lock_lost", error=str(exc))
                await self.release_liveness_lock()
        try:
            conn = await self._store.dedicated_connection()
        except (StorageError, asyncpg.PostgresError, OSError) as exc:
            log.warning("cluster.liveness_lock_unavailable", error=str(exc))
            return False
        # A fresh key each time: a session of this node that the database still believes
        # alive (cut off by a partition, its end closed long ago) may hold the last one
        # for hours, and peers judge this node by the key its heartbeat names.
        key = secrets.randbelow(2**31 - 2) + 1
        try:
            taken = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", LIVENESS_LOCK_CLASS, key, timeout=5
            )
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            log.warning("cluster.liveness_lock_unavailable", error=str(exc))
            taken = False
        if not taken:
            with contextlib.suppress(asyncpg.PostgresError, OSError, TimeoutError):
                await conn.close(timeout=5)
            return False
        self.lock_key = key
        self._lock_connection = conn
        return True

    async def release_liveness_lock(self) -> None:
        conn, self._lock_connection = self._lock_connection, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await conn.close(timeout=5)

    async def expire_crashed_nodes(self) -> list[str]:
        """Marks dead, at once, every other node whose heartbeat is fresh but whose liveness
        lock is free (its process died and PostgreSQL closed its session): its conversations
        can be taken over now instead of when its lease runs out. A node that is only silent
        keeps its session, so its lock, and its lease judges it as before."""
        rows = await self._store.run(
            lambda conn: conn.fetch(
                self._store.sql(
                    "UPDATE nodes n SET heartbeat_at = '-infinity' "
                    "WHERE n.node_id <> $1 AND n.lock_key IS NOT NULL "
                    "AND n.heartbeat_at > now() - make_interval(secs => $TTL) "
                    # A restarted database has dropped every session, and with them every
                    # node's lock: until a lease has passed, nodes are judged by it alone.
                    "AND pg_postmaster_start_time() < now() - make_interval(secs => $TTL) "
                    "AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' "
                    "AND l.granted AND l.objsubid = 2 "
                    "AND l.database = (SELECT oid FROM pg_database "
                    "                  WHERE datname = current_database()) "
                    "AND l.classid = $2::int::oid AND l.objid = n.lock_key::oid) "
                    "RETURNING n.node_id"
                ),
                self._store.node_id,
                LIVENESS_LOCK_CLASS,
            )
        )
        return [row[0] for row in rows]

    @property
    def node_id(self) -> str:
        return self._store.node_id

    async def heartbeat_node(self, address: str, agent_kinds: Sequence[str] = ()) -> None:
        """Registers this node or renews its heartbeat (and so all of its leases), with the
        agent kinds its workers have room for and, while it holds it, its liveness lock."""
        await self._store.run(
            lambda conn: conn.execute(
                "INSERT INTO nodes (node_id, address, heartbeat_at, agent_kinds, lock_key) "
                "VALUES ($1, $2, now(), $3, $4) ON CONFLICT (node_id) DO UPDATE SET "
                "heartbeat_at = now(), address = excluded.address, "
                "agent_kinds = excluded.agent_kinds, lock_key = excluded.lock_key",
                self._store.node_id,
                address,
                list(agent_kinds),
                # Judged by its lock only while it holds it; by its lease alone otherwise.
                self.lock_key if self.holds_liveness_lock else None,
            ),
            heartbeat=True,
        )

    async def nodes_running(self, agent_kind: str) -> list[tuple[str, str]]:
        """(node id, address) of live nodes whose workers have room for ``agent_kind``."""
        rows = await self._store.fetch(
            "SELECT node_id, address FROM nodes WHERE $1 = ANY(agent_kinds) "
            "AND heartbeat_at > now() - make_interval(secs => $TTL) ORDER BY random()",
            agent_kind,
        )
        return [(row[0], row[1]) for row in rows]

    async def leave_cluster(self) -> None:
        """Removes this node's row: what it still owns is taken over at once."""
        await self._store.run(
            lambda conn: conn.execute(
                "UPDATE nodes SET heartbeat_at = '-infinity' WHERE node_id = $1",
                self._store.node_id,
            )
        )

    async def node_views(self) -> list[NodeView]:
        """Every live node with how many conversations it holds leases on, by node id."""
        rows = await self._store.run(
            lambda conn: conn.fetch(
                self._store.sql(
                    "SELECT n.node_id, n.address, n.heartbeat_at, n.agent_kinds, "
                    "n.heartbeat_at + make_interval(secs => $TTL) AS lease_expires, "
                    "(SELECT count(*) FROM conversations c "
                    " WHERE c.running AND c.owner_node = n.node_id) AS held "
                    "FROM nodes n "
                    "WHERE n.heartbeat_at > now() - make_interval(secs => $TTL) "
                    "ORDER BY n.node_id"
                )
            )
        )
        return [
            NodeView(
                node_id=row["node_id"],
                address=row["address"],
                heartbeat_time=row["heartbeat_at"],
                lease_expire_time=row["lease_expires"],
                conversation_count=int(row["held"]),
                agent_kinds=tuple(sorted(row["agent_kinds"] or ())),
            )
            for row in rows
        ]

    async def live_nodes(self) -> list[tuple[str, str]]:
        """(node id, address) of every node whose heartbeat is fresh, this one included."""
        rows = await self._store.run(
            lambda conn: conn.fetch(
                self._store.sql(
                    "SELECT node_id, address FROM nodes "
                    "WHERE heartbeat_at > now() - make_interval(secs => $TTL) ORDER BY node_id"
                )
            )
        )
        return [(row[0], row[1]) for row in rows]

    # -- connections and client instances -------------------------------------------------

    async def put_connection(self, connection: Connection) -> None:
        await self._store.run(
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
            await self._store.run(
                lambda conn: conn.execute(
                    "DELETE FROM connections WHERE connection_id = ANY($1::text[])",
                    list(connection_ids),
                )
            )

    async def find_connection(self, connection_id: str) -> Connection | None:
        rows = await self._store.fetch(
            "SELECT connection_id, conversation_id, user_id, client_instance_id "
            "FROM connections WHERE connection_id = $1",
            connection_id,
        )
        return Connection(*rows[0]) if rows else None

    async def connections_of(self, conversation_id: str) -> list[Connection]:
        rows = await self._store.fetch(
            "SELECT connection_id, conversation_id, user_id, client_instance_id "
            "FROM connections WHERE conversation_id = $1",
            conversation_id,
        )
        return [Connection(*row) for row in rows]

    async def list_connections(
        self, user_id: str | None, after: str, limit: int, wanted: Sequence[str] = ()
    ) -> list[Connection]:
        where, args = page_filters("connection_id", after, limit, user_id, wanted)
        rows = await self._store.fetch(
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

        return await self._store.run(work)

    async def instances_seen_within(self, instance_ids: Sequence[str], seconds: float) -> set[str]:
        """Which of these instances heartbeated some node in the last ``seconds``."""
        if not instance_ids:
            return set()
        rows = await self._store.fetch(
            "SELECT client_instance_id FROM client_instances "
            "WHERE client_instance_id = ANY($1::text[]) "
            "AND seen_at > now() - make_interval(secs => $2)",
            list(instance_ids),
            float(seconds),
        )
        return {row[0] for row in rows}
