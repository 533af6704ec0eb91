"""The PostgreSQL schema: the migrations shipped in ``migrations/``, applied in order by one
node at a time (``convsvc migrate``, or every node as it opens its store)."""

from __future__ import annotations

from importlib import resources

import asyncpg
import structlog

from convsvc.storage.base import StorageError, StoreUnavailable

log = structlog.get_logger(__name__)

_MIGRATIONS_LOCK = 0x636F6E76  # any constant: one migrator at a time across the cluster
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)
"""What asyncpg raises when the database cannot be reached."""


def unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the database is unreachable ({type(exc).__name__}: {exc})")


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
    except UNREACHABLE as exc:
        raise unavailable(exc) from exc
    return applied


async def migrate(dsn: str, password: str | None = None) -> list[str]:
    """``convsvc migrate``: brings a database's schema up to date."""
    try:
        pool = await asyncpg.create_pool(dsn, password=password, min_size=1, max_size=1)
    except UNREACHABLE as exc:
        raise unavailable(exc) from exc
    except asyncpg.PostgresError as exc:
        raise StorageError(f"the database refused the connection: {exc}") from exc
    try:
        return await migrate_pool(pool)
    finally:
        await pool.close()
