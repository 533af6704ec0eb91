"""The cluster's per-conversation queries stay cheap while PostgreSQL's statistics are stale.

Nodes start conversations faster than autovacuum analyzes the table: for minutes the
statistics say nothing runs. A query whose plan then walks every running conversation made
each start slower than the one before (the cluster's start rate fell as nodes filled). Each
query here runs under EXPLAIN ANALYZE against a real PostgreSQL in that state, with custom
and with generic plans (asyncpg prepares every statement), and may examine only a few rows.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from convsvc.storage.postgres import (
    OLDEST_OF_USER,
    OWNED_BY,
    OWNER_OF,
    RUNNING_OF_USER,
    STOP_ORPHAN,
    WITHOUT_OWNER,
    PostgresStore,
    same_user,
)
from convsvc.storage.postgres_schema import migrate

RUNNING = 20_000
USERS = 200  # 100 running conversations each
EXAMINED_AT_MOST = 1_000  # a user's own, and a few index pages: not everyone's


@pytest.fixture
async def stale(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A database whose statistics were taken when nothing ran, with RUNNING running now."""
    await migrate(postgres_dsn)
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("ALTER TABLE conversations SET (autovacuum_enabled = false)")
    now = datetime.now(UTC)
    columns = ["conversation_id", "user_id", "agent", "settings", "create_time"]
    columns += ["last_active_time", "running", "owner_node", "owner_address", "lease_epoch"]
    stopped = (
        (f"old-{n}", f"old-{n}", "echo", "{}", now, now, False, None, None, 1) for n in range(2_000)
    )
    await conn.copy_records_to_table("conversations", records=stopped, columns=columns)
    await conn.execute("ANALYZE conversations")
    running = (
        (f"run-{n}", f"user-{n % USERS}", "echo", "{}", now, now, True, f"node-{n % 3}", "a:1", 1)
        for n in range(RUNNING)
    )
    await conn.copy_records_to_table("conversations", records=running, columns=columns)
    yield conn
    await conn.close()


def examined(plan: dict[str, Any]) -> int:
    """Rows the plan's scans read: those they returned and those their filters dropped."""
    own = 0
    if "Scan" in plan["Node Type"]:
        own = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        own += plan.get("Rows Removed by Index Recheck", 0)
    return own * plan.get("Actual Loops", 1) + sum(examined(p) for p in plan.get("Plans", []))


async def rows_examined(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    """What ``sql`` reads, run under EXPLAIN ANALYZE in a transaction rolled back after."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        statement = await conn.prepare(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
        document = await statement.fetchval(*args)
    finally:
        await transaction.rollback()
    [explained] = json.loads(document) if isinstance(document, str) else document
    return examined(explained["Plan"])


@pytest.mark.parametrize("plans", ["force_custom_plan", "force_generic_plan"])
async def test_each_conversation_query_reads_only_its_own_rows_while_statistics_are_stale(
    stale: asyncpg.Connection, postgres_dsn: str, plans: str
) -> None:
    await stale.execute(f"SET plan_cache_mode = {plans}")
    sql = PostgresStore(postgres_dsn, node_id=uuid.uuid4().hex).sql
    queries: dict[str, tuple[str, tuple[Any, ...]]] = {
        "owner of a conversation": (sql(OWNER_OF), ("run-77",)),
        "a user's running count": (
            RUNNING_OF_USER.format(same_user=same_user("user-7")),
            ("user-7", "run-7"),
        ),
        "running count without a user": (
            RUNNING_OF_USER.format(same_user=same_user(None)),
            (None, "run-7"),
        ),
        "a user's oldest": (
            sql(OLDEST_OF_USER.format(same_user=same_user("user-7"))),
            ("user-7", "run-7", 3),
        ),
        "stop an orphan": (sql(STOP_ORPHAN), ("run-77",)),
        "conversations without an owner": (WITHOUT_OWNER, (100,)),
        "conversations of dead nodes": (OWNED_BY, (["node-gone"], 100)),
    }
    read = {
        name: await rows_examined(stale, query, *args) for name, (query, args) in queries.items()
    }
    assert {name: rows for name, rows in read.items() if rows > EXAMINED_AT_MOST} == {}
