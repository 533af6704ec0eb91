"""Revocations reach the streams of every node: a token revoked through one node ends the
streams it opened on all of them at once.

PostgreSQL announces each revocation (LISTEN/NOTIFY, in the revoking transaction); this node
listens on a connection of its own and ends the streams here that hold the token. When that
connection is lost, news sent meanwhile is missed: on every (re)connect the node asks which of
the tokens its streams hold were revoked.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from convsvc.storage import StorageError
from convsvc.storage.postgres import REVOCATIONS_CHANNEL, PostgresStore
from convsvc.transport.credentials import StreamCredentials

log = structlog.get_logger(__name__)

_RETRY_SECONDS = 1.0
"""Pause before listening again after the connection was lost."""


class RevocationListener:
    def __init__(self, store: PostgresStore, streams: StreamCredentials) -> None:
        self._store = store
        self._streams = streams
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-revocations")

    async def listening(self) -> None:
        """Returns once this node hears revocations (start-up waits for it)."""
        await self._listening.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                lost = asyncio.Event()
                conn = await self._store.listen(REVOCATIONS_CHANNEL, self._streams.revoked)
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                # What was revoked while this node did not listen.
                for token_id in await self._store.revoked_among(sorted(self._streams.token_ids())):
                    self._streams.revoked(token_id)
                self._listening.set()
                await lost.wait()
                log.warning("cluster.revocations_unheard", error="the connection was lost")
            except (StorageError, OSError, asyncpg.PostgresError) as exc:
                log.warning("cluster.revocations_unheard", error=str(exc))
            finally:
                self._listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):  # closing a broken connection
                        await conn.close(timeout=1)
            await asyncio.sleep(_RETRY_SECONDS)
