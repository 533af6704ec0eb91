"""The cluster's shared directory in PostgreSQL: the nodes (their addresses, heartbeats and
the agent kinds their workers have room for), which connection watches which conversation,
and the client instances' heartbeats. Any node can answer from it; ``convsvc.cluster`` keeps
it current.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from convsvc.domain import Connection, NodeView
from convsvc.storage.postgres import PostgresStore
from convsvc.storage.sql import page_filters


class PostgresDirectory:
    """Nodes, connections and client instances, on the store's database."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    @property
    def node_id(self) -> str:
        return self._store.node_id

    async def heartbeat_node(self, address: str, agent_kinds: Sequence[str] = ()) -> None:
        """Registers this node or renews its heartbeat (and so all of its leases), with the
        agent kinds its workers have room for."""
        await self._store.run(
            lambda conn: conn.execute(
                "INSERT INTO nodes (node_id, address, heartbeat_at, agent_kinds) "
                "VALUES ($1, $2, now(), $3) ON CONFLICT (node_id) DO UPDATE SET "
                "heartbeat_at = now(), address = excluded.address, "
                "agent_kinds = excluded.agent_kinds",
                self._store.node_id,
                address,
                list(agent_kinds),
            )
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
