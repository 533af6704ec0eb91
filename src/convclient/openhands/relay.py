"""Relays a conversation's events from convsvc to one socket.io connection of this web process.

Each connection gets its own resumable tail and is sent to by its own id (never to the room),
so web replicas sharing a Redis socket.io manager deliver every event once: only the replica
that joined a connection relays to it. The first event a relay sends follows the backlog the
browser was given, so a (re)connecting browser sees neither a gap nor a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from convclient.client import AsyncConvsvcClient
from convclient.errors import ConvsvcClientError
from convclient.openhands.delivery import is_agent_state_change, live_view, replayed

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, Any]], Awaitable[None]]

LOST_STREAM_STATUS = {
    "status_update": True,
    "type": "error",
    "id": "STATUS$ERROR",
    "message": "Lost the connection to the conversation service; reload to reconnect.",
}


class ConnectionRelay:
    """Sends one connection every event after ``start_id``, each exactly once, in order.

    With ``replay_by_openhands`` the relay first waits until OpenHands has replayed the backlog
    through the event store that join_conversation returned (see :meth:`backlog_replayed`) and
    continues after it; otherwise it replays the backlog itself, with OpenHands' replay rules.
    """

    def __init__(
        self,
        *,
        client: AsyncConvsvcClient,
        emit: Emit,
        conversation_id: str,
        user_id: str,
        start_id: int,
        backlog_end: int,
        replay_by_openhands: bool,
        replay_wait_seconds: float = 30.0,
    ) -> None:
        self.conversation_id = conversation_id
        self._client = client
        self._emit = emit
        self._user_id = user_id
        self._start_id = start_id
        self._backlog_end = backlog_end
        self._replay_by_openhands = replay_by_openhands
        self._replay_wait_seconds = replay_wait_seconds
        self._loop = asyncio.get_running_loop()
        self._replayed_through: asyncio.Future[int] = self._loop.create_future()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"relay:{self.conversation_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def backlog_replayed(self, last_id: int) -> None:
        """Called by the connection's event store when OpenHands' replay read through last_id."""

        def settle() -> None:
            if not self._replayed_through.done():
                self._replayed_through.set_result(last_id)

        self._loop.call_soon_threadsafe(settle)

    async def _run(self) -> None:
        start_id, backlog_end = self._start_id, self._backlog_end
        if self._replay_by_openhands:
            try:
                replayed_through = await asyncio.wait_for(
                    asyncio.shield(self._replayed_through), self._replay_wait_seconds
                )
            except TimeoutError:
                log.warning(
                    "OpenHands did not replay %s; the relay replays it", self.conversation_id
                )
            else:
                start_id = max(start_id, replayed_through + 1)
                backlog_end = start_id - 1  # nothing left for the relay to replay
        try:
            await self._relay(start_id, backlog_end)
        except ConvsvcClientError as exc:
            log.warning("event relay of %s ended: %s", self.conversation_id, exc)
            await self._emit(LOST_STREAM_STATUS)

    async def _relay(self, start_id: int, backlog_end: int) -> None:
        held_state: dict[str, Any] | None = None  # the backlog's last agent state, sent last
        async for batch in self._client.tail_events(
            self.conversation_id, user_id=self._user_id, start_id=start_id
        ):
            if batch.status_update is not None:
                await self._emit(batch.status_update)
            for event in batch.events:
                payload = event.payload
                if event.id <= backlog_end:
                    if is_agent_state_change(payload):
                        held_state = payload
                    elif replayed(payload):
                        await self._emit(payload)
                    if event.id < backlog_end:
                        continue
                if held_state is not None:
                    await self._emit(held_state)
                    held_state = None
                if event.id > backlog_end and (view := live_view(payload)) is not None:
                    await self._emit(view)
