"""The storage interface the engine depends on.

Backends: SQLite (embedded, the default) and, for several nodes, PostgreSQL. Whatever the
backend, appends are committed in the order they were submitted, an append's future completes
only once its events are durable, and committed events are reported to the commit listener in
commit order, which is how live subscribers learn of them.

A write that conflicts with what one conversation's log already holds fails that conversation
only (:class:`ConversationLogError`): its later writes are refused until the engine has
re-read where the log ends, and every other conversation goes on. Any other failure is the
store's own (:class:`StorageError`) and stops all writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from convsvc.domain import (
    AuditEntry,
    AuditQuery,
    ConversationRecord,
    ConversationSearch,
    DeliveryQuery,
    DeliveryState,
    Event,
    IdempotencyRecord,
    Notification,
    StoredConversation,
    StoredEvent,
    WebhookDelivery,
    WebhookEndpoint,
)

CommitListener = Callable[[Sequence[Event]], None]


class StorageError(Exception):
    """The backend failed; the engine treats it as fatal for durability."""


class ConversationLogError(StorageError):
    """A write conflicted with one conversation's log (e.g. an id another writer took).

    Only that conversation is affected: the store refuses its writes until
    :meth:`ConversationStore.clear_log_failure` is called by whoever re-read the log's end.
    """

    def __init__(self, conversation_id: str, message: str) -> None:
        super().__init__(message)
        self.conversation_id = conversation_id


class LogInterrupted(ConversationLogError):
    """The database could not be reached while this conversation's events were being
    committed: whether they were is unknown until the log is read again."""


class OwnerMoved(ConversationLogError):
    """This node no longer holds the conversation's lease (another node claimed it, or it
    was released): the write was fenced off and nothing of it was stored."""

    def __init__(self, conversation_id: str, owner_address: str | None) -> None:
        where = f"node {owner_address}" if owner_address else "no node (it is being moved)"
        super().__init__(
            conversation_id,
            f"conversation {conversation_id} is now owned by {where}; this node may no longer "
            "write to it",
        )
        self.owner_address = owner_address


class Durability(asyncio.Future[None]):
    """The outcome of one submitted write, awaited by its caller. ``settled`` gets the same
    outcome (None, or the error) even when the caller has left and this future was
    cancelled with it: what must outlive the caller (a request id's slot, the handling of a
    log whose commit failed) waits on ``settled``, without delaying the caller's wake-up."""

    def __init__(self) -> None:
        super().__init__()
        self.settled: asyncio.Future[Exception | None] = self.get_loop().create_future()


class StoreUnavailable(StorageError):
    """The database cannot be reached now; the store recovers once it can."""


@dataclass(slots=True, frozen=True)
class EventPage:
    """Events read in one go, and where the range continues (None: it is exhausted)."""

    events: list[StoredEvent]
    next_id: int | None


def plan_page(
    sizes: Sequence[Sequence[int]], limit: int, max_bytes: int, reverse: bool
) -> tuple[tuple[int, int] | None, int | None]:
    """Which events a page takes, from (id, encoded size) of up to ``limit + 1`` events in
    page order: the id range to load (None: none) and where the range continues.

    Backends read sizes first so that events left out of a page are never loaded (a page of
    1,000 events of 1 MiB would be a gigabyte); the first event always fits.
    """
    taken, total = 0, 0
    for _, size in sizes[:limit]:
        if taken and total + size > max_bytes:
            break
        taken, total = taken + 1, total + size
    next_id = sizes[taken][0] if taken < len(sizes) else None
    if not taken:
        return None, next_id
    low, high = sizes[0][0], sizes[taken - 1][0]
    return ((high, low) if reverse else (low, high)), next_id


class ConversationStore(Protocol):
    """Conversations, their event logs and idempotency records."""

    page_token_key: bytes
    """A secret made with the store and kept in it (so it outlives restarts and is shared by
    every node of a cluster) that signs page tokens."""

    async def open(self) -> None:
        """Connects, creating the schema if needed."""

    async def close(self) -> None:
        """Flushes pending writes and disconnects."""

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Registers a callback told of every committed batch, in commit order."""

    async def save_conversation(
        self,
        record: ConversationRecord,
        idempotency: IdempotencyRecord | None = None,
        notifications: Sequence[Notification] = (),
    ) -> None:
        """Creates or updates a conversation record (durable on return), with the webhook
        notifications the change causes in the same commit."""

    def submit_conversation(
        self,
        record: ConversationRecord,
        idempotency: IdempotencyRecord | None = None,
        events: Sequence[Event] = (),
        notifications: Sequence[Notification] = (),
    ) -> Durability:
        """Queues a conversation record like ``submit_events`` queues events (and, in the
        same commit, the first ``events`` of its log: a fork's copied history, which notifies
        nothing)."""

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """Returns a conversation record, or None."""

    async def latest_event_id(self, conversation_id: str) -> int:
        """Returns the conversation's newest event id, or -1."""

    async def search_conversations(self, query: ConversationSearch) -> list[StoredConversation]:
        """Stored conversations that match, newest activity first (then by id, descending),
        at most ``query.limit``."""
        ...

    async def describe_conversation(
        self, conversation_id: str, labels: dict[str, str] | None, title: str | None
    ) -> bool:
        """Replaces a stored conversation's labels and/or title (None: kept); False when it
        is not stored."""
        ...

    def submit_events(
        self, events: Sequence[Event], idempotency: IdempotencyRecord | None = None
    ) -> Durability:
        """Queues encoded events (ids already assigned) and, atomically with them, an
        idempotency record, behind every earlier submission; returns at once.

        The future completes once they are durable, or fails with StorageError. Raises
        StorageError at once when the store can take no more writes. Because commits keep
        submission order, a later event is never durable without every earlier one, and an
        empty submission is a barrier: it completes once everything before it is durable.
        """

    async def append_events(
        self, events: Sequence[Event], idempotency: IdempotencyRecord | None = None
    ) -> None:
        """``submit_events`` and wait until durable."""

    async def read_events(
        self,
        conversation_id: str,
        start_id: int,
        end_id: int | None = None,
        *,
        reverse: bool = False,
        limit: int = 100,
    ) -> list[StoredEvent]:
        """Returns up to ``limit`` events with ``start_id <= id <= end_id``."""

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
        """Up to ``limit`` events of the range whose encodings add up to at most
        ``max_bytes`` (the first event always, so any event can be read), without loading
        the ones left out."""

    def clear_log_failure(self, conversation_id: str) -> None:
        """Accepts writes for a conversation again after a ConversationLogError."""

    async def get_idempotency(self, scope: str, request_id: str) -> IdempotencyRecord | None:
        """Returns the recorded answer of an earlier call with this request id."""

    def submit_idempotency(self, record: IdempotencyRecord) -> Durability:
        """Queues the answer of a call that changed no event log (its future completes once
        it is durable)."""

    async def save_idempotency(self, record: IdempotencyRecord) -> None:
        """``submit_idempotency`` and wait until durable."""

    def record_audit(self, entry: AuditEntry) -> None:
        """Adds an audit entry to the next commit (a barrier submitted after it, e.g.
        ``submit_events(())``, completes once it is durable)."""
        ...

    async def list_audit(self, query: AuditQuery) -> list[AuditEntry]:
        """Audit entries after ``query.after``, oldest first, at most ``query.limit``."""
        ...

    async def revoke_token(self, token_id: str, expire_time: datetime) -> None:
        """Records that a scoped token is revoked (kept until ``expire_time``)."""
        ...

    async def token_revoked(self, token_id: str) -> bool: ...

    async def prune_idempotency(self, older_than: datetime) -> int:
        """Forgets request ids recorded before ``older_than``; returns how many."""
        ...

    # The webhook outbox (see ``outbox``).

    async def save_webhook(self, endpoint: WebhookEndpoint) -> None:
        """Registers an endpoint, or replaces the one with its id."""
        ...

    async def list_webhooks(self) -> list[WebhookEndpoint]: ...

    async def delete_webhook(self, webhook_id: str) -> bool:
        """Removes an endpoint (its pending deliveries die); False when there was none."""
        ...

    async def claim_deliveries(
        self, node: str, limit: int, lease_seconds: float
    ) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
        """Up to ``limit`` pending deliveries that are due and that no other node holds,
        now held by ``node`` for ``lease_seconds``, with their endpoints."""
        ...

    async def finish_attempt(
        self,
        delivery_id: str,
        node: str,
        state: DeliveryState,
        status_code: int,
        error: str,
        next_attempt_time: datetime | None,
    ) -> None:
        """Records an attempt's outcome, if ``node`` still holds the delivery."""
        ...

    async def list_deliveries(self, query: DeliveryQuery) -> list[WebhookDelivery]:
        """Deliveries that match, newest first."""
