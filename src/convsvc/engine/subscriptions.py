"""Live fan-out of committed events to stream subscribers.

Publishing never waits: each subscriber has a buffer bounded in events and in bytes, and one
that falls further behind than the buffer allows is dropped (it resumes by id), so a slow
reader can neither stall the conversation or the other readers nor fill the memory.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence

from convsvc.domain import StatusUpdate, StoredEvent
from convsvc.errors import ConvsvcError

StreamItem = StoredEvent | StatusUpdate
"""A committed event, or a transient status update."""


def item_size(item: StreamItem) -> int:
    """What an item costs a subscriber's buffer: its real encoded size."""
    return len(item.encoded)


class SubscriberTooSlow(ConvsvcError):
    """The subscriber's buffer overflowed; it must resume from the last id it received."""

    reason = "SUBSCRIBER_TOO_SLOW"


class Subscription:
    """One stream's buffer of items not yet sent."""

    __slots__ = (
        "_bytes",
        "_error",
        "_items",
        "_limit",
        "_limit_bytes",
        "_wakeup",
        "conversation_id",
        "follower",
    )

    def __init__(
        self, conversation_id: str, limit: int, limit_bytes: int, *, follower: bool = False
    ) -> None:
        self.conversation_id = conversation_id
        self.follower = follower
        """Another node following this one's live events (ended when the loop leaves)."""
        self._limit = limit
        self._limit_bytes = limit_bytes
        self._bytes = 0
        self._items: deque[StreamItem] = deque()
        self._wakeup = asyncio.Event()
        self._error: ConvsvcError | None = None

    def push(self, items: Iterable[StreamItem]) -> bool:
        """Buffers items; returns False (and fails the subscription) on overflow."""
        if self._error is not None:
            return False
        self._items.extend(items)
        self._bytes += sum(item_size(item) for item in items)
        if len(self._items) > self._limit or self._bytes > self._limit_bytes:
            self._items.clear()
            self._bytes = 0
            self.fail(
                SubscriberTooSlow(
                    f"the stream fell more than {self._limit} events or {self._limit_bytes} "
                    "bytes behind and was dropped; resume from the last id received"
                )
            )
            return False
        self._wakeup.set()
        return True

    @property
    def waiting(self) -> int:
        """Items buffered and not yet taken by the stream."""
        return len(self._items)

    def fail(self, error: ConvsvcError) -> None:
        """Ends the subscription with ``error`` once buffered items are taken."""
        if self._error is None:
            self._error = error
        self._wakeup.set()

    def drain(self) -> list[StreamItem]:
        """Takes every buffered item without waiting."""
        taken = list(self._items)
        self._items.clear()
        self._bytes = 0
        return taken

    async def next_items(self, max_events: int, max_bytes: int) -> list[StreamItem]:
        """Waits for and takes up to ``max_events`` buffered items that add up to at most
        ``max_bytes`` (at least one, which always fits in a message on its own)."""
        while not self._items:
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()
        taken: list[StreamItem] = []
        total = 0
        while self._items and len(taken) < max_events:
            size = item_size(self._items[0])
            if taken and total + size > max_bytes:
                break
            taken.append(self._items.popleft())
            total += size
        self._bytes -= total
        return taken


class Broadcaster:
    """Subscribers per conversation."""

    def __init__(self, buffer_limit: int, buffer_bytes: int) -> None:
        self._buffer_limit = buffer_limit
        self._buffer_bytes = buffer_bytes
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._ended: ConvsvcError | None = None

    def subscribe(self, conversation_id: str, *, follower: bool = False) -> Subscription:
        """A new subscription (raises the error ``fail_all`` ended every stream with)."""
        if self._ended is not None:
            raise self._ended
        subscription = Subscription(
            conversation_id, self._buffer_limit, self._buffer_bytes, follower=follower
        )
        self._subscribers[conversation_id].add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.conversation_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.conversation_id]

    def publish(self, conversation_id: str, items: Sequence[StreamItem]) -> None:
        subscribers = self._subscribers.get(conversation_id)
        if not subscribers:
            return
        for subscription in list(subscribers):
            if not subscription.push(items):
                subscribers.discard(subscription)

    def backlog(self) -> tuple[int, int]:
        """(live subscribers, the most items any of them has waiting)."""
        count, most = 0, 0
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                count += 1
                most = max(most, subscription.waiting)
        return count, most

    def subscriber_count(self, conversation_id: str) -> int:
        return len(self._subscribers.get(conversation_id, ()))

    def fail_followers(self, conversation_id: str, error: ConvsvcError) -> None:
        """Ends other nodes' follower subscriptions of a conversation (its loop left)."""
        subscribers = self._subscribers.get(conversation_id)
        for subscription in list(subscribers or ()):
            if subscription.follower:
                subscription.fail(error)
                self.unsubscribe(subscription)

    def fail_all(self, error: ConvsvcError) -> None:
        """Ends every subscription, and those asked for later, e.g. on shutdown."""
        self._ended = error
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.fail(error)
        self._subscribers.clear()
