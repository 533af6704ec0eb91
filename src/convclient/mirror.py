"""A local copy of the service's running conversations and their connections, kept current by
WatchConversations, so that list-style questions are answered without a call.

OpenHands asks its manager which loops run and which connections exist many times per page
view; polling the service for each answer costs a round trip each time. The mirror answers
from memory while its watch is live and says so (``live``); the owner falls back to calls
when it is not (the watch is reconnecting, or the service does not offer it).

After a change this process made, ``settle`` waits (briefly) until the watch has reported it,
so that the process reads its own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import grpc

from convclient.client import AsyncConvsvcClient
from convclient.errors import ConvsvcClientError
from convclient.models import (
    ChangeKind,
    Conversation,
    ConversationStatus,
    WatchedConversation,
    WatchUpdate,
)

log = logging.getLogger(__name__)

SETTLE_SECONDS = 2.0
"""The longest a change this process made may take to be reported before reads go on."""
_RUNNING = (ConversationStatus.STARTING, ConversationStatus.RUNNING)


class ConversationMirror:
    def __init__(self, client: AsyncConvsvcClient) -> None:
        self._client = client
        self._conversations: dict[str, WatchedConversation] = {}
        self._live = False
        self._updated = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        """Whether the answers are current (the watch is connected and in sync)."""
        return self._live

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="convclient-mirror")

    async def following_ended(self) -> None:
        """Waits until the mirror has stopped following (the service has no watch, or the
        watch failed for good): from then on it is never live."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- answers ------------------------------------------------------------------------

    def running(self, user_id: str, conversation_ids: Iterable[str] | None) -> list[Conversation]:
        """Starting and running conversations (of ``user_id`` when set), as ListConversations
        lists them."""
        wanted = None if conversation_ids is None else set(conversation_ids)
        return sorted(
            (
                w.conversation
                for cid, w in self._conversations.items()
                if w.conversation.status in _RUNNING
                and (not user_id or w.conversation.user_id == user_id)
                and (wanted is None or cid in wanted)
            ),
            key=lambda c: c.conversation_id,
        )

    def connections(self, user_id: str, conversation_ids: Iterable[str] | None) -> dict[str, str]:
        """Connection id -> conversation id, for conversations of ``user_id`` when set."""
        return {
            connection_id: conversation.conversation_id
            for conversation in self.running(user_id, conversation_ids)
            for connection_id in self._conversations[conversation.conversation_id].connection_ids
        }

    async def settle(self, reflected: Callable[[ConversationMirror], bool]) -> None:
        """Waits until ``reflected(self)`` holds (a change this process made has been
        reported), for at most SETTLE_SECONDS; returns at once when the mirror is not live."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_SECONDS):
                while self._live and not reflected(self):
                    self._updated.clear()
                    await self._updated.wait()

    async def wait_live(self) -> None:
        """Waits until the mirror is live (its first snapshot arrived)."""
        while not self._live:
            self._updated.clear()
            await self._updated.wait()

    def has_conversation(self, conversation_id: str) -> bool:
        watched = self._conversations.get(conversation_id)
        return watched is not None and watched.conversation.status in _RUNNING

    def has_connection(self, conversation_id: str, connection_id: str) -> bool:
        watched = self._conversations.get(conversation_id)
        return watched is not None and connection_id in watched.connection_ids

    def holds_connection(self, connection_id: str) -> bool:
        return any(connection_id in w.connection_ids for w in self._conversations.values())

    # -- following the watch --------------------------------------------------------------

    async def _follow(self) -> None:
        try:
            updates = self._client.watch_conversations(on_interrupted=self._interrupted)
            async for update in updates:
                self._apply(update)
        except ConvsvcClientError as exc:
            self._interrupted()
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                log.info("convsvc offers no conversation watch here (%s); polling instead", exc)
            else:
                log.warning("the conversation watch of convsvc ended: %s; polling instead", exc)

    def _interrupted(self) -> None:
        self._live = False
        self._updated.set()  # waiters stop waiting for a mirror that is no longer current

    def _apply(self, update: WatchUpdate) -> None:
        if update.snapshot is not None:
            self._conversations = {w.conversation.conversation_id: w for w in update.snapshot}
            self._live = True
        for change in update.changes:
            cid = change.watched.conversation.conversation_id
            if change.kind is ChangeKind.CLOSED:
                self._conversations.pop(cid, None)
            else:
                self._conversations[cid] = change.watched
        self._updated.set()
