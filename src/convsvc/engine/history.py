"""Reading the logs: pages of stored events, streams of stored then live events, and pages
of the audit log."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence

from convsvc import validation
from convsvc.codec import decode_event, encode_event
from convsvc.config import EngineConfig
from convsvc.domain import AuditEntry, AuditQuery, Event, StoredEvent
from convsvc.engine.log import EventLog
from convsvc.engine.registry import RuntimeRegistry
from convsvc.engine.subscriptions import (
    Broadcaster,
    StreamItem,
    SubscriberTooSlow,
    Subscription,
)
from convsvc.engine.visibility import check_visible
from convsvc.errors import InvalidArgument, ResourceExhausted, Unavailable
from convsvc.paging import decode_token, encode_token
from convsvc.storage import ConversationStore


def _check_start_id(start_id: int, hint: str = "") -> None:
    if start_id < 0:
        raise InvalidArgument(
            f"start_id must not be negative (got {start_id}){hint}",
            reason="INVALID_ARGUMENT",
            metadata={"field": "start_id"},
        )


class EventHistory:
    """Searches and streams conversations' events, and pages through the audit log."""

    def __init__(
        self,
        config: EngineConfig,
        store: ConversationStore,
        registry: RuntimeRegistry,
        broadcaster: Broadcaster,
        event_log: EventLog,
    ) -> None:
        self._config = config
        self._store = store
        self._registry = registry
        self._broadcaster = broadcaster
        self._log = event_log

    async def copy_for_fork(self, source: str, at_event_id: int | None, target: str) -> list[Event]:
        """The source's committed events 0..``at_event_id`` (its newest when None), as
        events of ``target`` with the same ids, timestamps and contents."""
        runtime = self._registry.get(source)
        latest = (
            runtime.latest_event_id
            if runtime is not None
            else await self._store.latest_event_id(source)
        )
        end = latest if at_event_id is None else at_event_id
        if not 0 <= end <= latest:
            raise InvalidArgument(
                f"conversation {source} has events 0 to {latest}; at_event_id {end} is none "
                "of them",
                reason="EVENT_NOT_FOUND",
                metadata={"field": "at_event_id", "latest_event_id": str(latest)},
            )
        copied: list[Event] = []
        while len(copied) <= end:
            page = await self._store.read_events(source, len(copied), end, limit=1000)
            if not page:
                break
            for stored in page:
                event = decode_event(stored.encoded)
                event.conversation_id = target
                event.encoded = encode_event(event)
                copied.append(event)
        return copied

    def page_size(self, page_size: int) -> int:
        """A request's page size, checked and defaulted."""
        return validation.check_page_size(
            page_size, self._config.default_page_size, self._config.max_page_size
        )

    async def search_events(
        self,
        *,
        conversation_id: str,
        user_id: str = "",
        start_id: int = 0,
        end_id: int | None = None,
        reverse: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[StoredEvent], str]:
        """A page of stored events with ``start_id <= id <= end_id``."""
        cid = validation.check_id("conversation_id", conversation_id)
        _check_start_id(start_id)
        if end_id is not None and end_id < start_id:
            raise InvalidArgument(
                f"end_id ({end_id}) is below start_id ({start_id})",
                reason="INVALID_ARGUMENT",
                metadata={"field": "end_id"},
            )
        size = self.page_size(page_size)
        await check_visible(self._registry, self._store, cid, validation.check_user_id(user_id))
        query = ["events", cid, start_id, end_id, reverse]
        key = self._store.page_token_key
        low, high = start_id, end_id
        if page_token:
            position = decode_token(key, page_token, query, int)
            if reverse:
                high = position
            else:
                low = position
        page = await self._store.read_page(
            cid, low, high, reverse=reverse, limit=size, max_bytes=self._config.max_batch_bytes
        )
        token = encode_token(key, query, page.next_id) if page.next_id is not None else ""
        return page.events, token

    async def stream_events(
        self,
        *,
        conversation_id: str,
        user_id: str = "",
        start_id: int = 0,
        max_batch: int = 0,
        owner_only: bool = False,
    ) -> AsyncIterator[list[StreamItem]]:
        """Yields batches of stored then live events from ``start_id``, each exactly once.

        Subscribing before reading the store means every event is either read or buffered;
        ids below the next expected one are duplicates of what was read and are skipped.
        ``owner_only``: for another node following this one, which must follow whoever runs
        the loop (OWNER_MOVED when that is not this node).
        """
        cid = validation.check_id("conversation_id", conversation_id)
        _check_start_id(start_id, "; use 0 for the whole log")
        if max_batch < 0:
            raise InvalidArgument(
                "max_batch_size must not be negative",
                reason="INVALID_ARGUMENT",
                metadata={"field": "max_batch_size"},
            )
        batch = min(max_batch or self._config.max_stream_batch, self._config.max_stream_batch)
        await check_visible(self._registry, self._store, cid, validation.check_user_id(user_id))
        max_bytes = self._config.max_batch_bytes
        if owner_only and self._registry.running(cid) is None:
            raise Unavailable(f"conversation {cid} does not run on this node", reason="OWNER_MOVED")
        subscription = self._broadcaster.subscribe(cid, follower=owner_only)
        next_id = start_id
        try:
            async for page in self._log.read_range(cid, next_id, None, batch):
                next_id = page[-1].id + 1
                yield list[StreamItem](page)
            while True:
                items = await subscription.next_items(batch, max_bytes)
                out: list[StreamItem] = []
                for item in items:
                    if not isinstance(item, StoredEvent):
                        out.append(item)
                        continue
                    if item.id < next_id:
                        continue
                    if item.id > next_id:  # defensive: fill from the log rather than skip
                        if out:
                            yield out
                            out = []
                        async for page in self._log.read_range(cid, next_id, item.id - 1, batch):
                            next_id = page[-1].id + 1
                            yield list[StreamItem](page)
                    out.append(item)
                    next_id = item.id + 1
                if out:
                    yield out
        except SubscriberTooSlow as exc:
            raise ResourceExhausted(
                exc.message, reason=exc.reason, metadata={"resume_start_id": str(next_id)}
            ) from None
        finally:
            self._broadcaster.unsubscribe(subscription)

    @contextlib.contextmanager
    def live(self, conversation_id: str) -> Iterator[Subscription]:
        """What reaches a conversation's live streams from now on (committed events and
        status updates), for an observer in this process: no store read, no user check."""
        subscription = self._broadcaster.subscribe(conversation_id)
        try:
            yield subscription
        finally:
            self._broadcaster.unsubscribe(subscription)

    def publish_followed(self, conversation_id: str, items: Sequence[StreamItem]) -> None:
        """Fans out events another node committed (see cluster.follow) to local streams."""
        self._broadcaster.publish(conversation_id, items)

    async def list_audit(
        self,
        *,
        conversation_id: str = "",
        user_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[AuditEntry], str]:
        """A page of the audit log, oldest first."""
        cid = validation.check_optional_id("conversation_id", conversation_id) or ""
        user = validation.check_user_id(user_id) or ""
        size = self.page_size(page_size)
        query = ["audit", cid, user]
        key = self._store.page_token_key
        after = decode_token(key, page_token, query, int) if page_token else 0
        await self._log.flush()  # entries of calls already answered are committed behind them
        entries = await self._store.list_audit(AuditQuery(after, cid, user, size + 1))
        token = encode_token(key, query, entries[size - 1].sequence) if len(entries) > size else ""
        return entries[:size], token
