"""Admission under the per-user limit: the policies, which loops a start may stop, and the
queue of starts that wait for room (policy ``queue``).

A start that leaves the queue holds a reservation until its loop is registered, so another
queued start cannot take the room it waited for, and a start of another policy counts it
(an evict_oldest start evicts to make room for both).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from convsvc.config import EngineConfig
from convsvc.domain import AdmissionPolicy, ConversationStatus, ConversationView
from convsvc.engine.registry import RuntimeRegistry
from convsvc.engine.runtime import ConversationRuntime
from convsvc.engine.visibility import check_owner
from convsvc.engine.watch import ChangeFeed, ChangeKind, WatchedConversation
from convsvc.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    Unimplemented,
)
from convsvc.storage import ConversationStore

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class QueuedStart:
    """A start waiting in its user's queue."""

    conversation_id: str
    user_id: str | None
    agent: str
    create_time: datetime
    latest_event_id: int
    is_new: bool
    """No conversation with this id existed when it queued."""
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    left: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when it leaves the queue (admitted or given up)."""
    admitted: bool = False
    """It left the queue with room to start (not because its caller gave up)."""
    published_position: int = 0
    """The position watchers were last told."""


@dataclass(eq=False)
class Reservation:
    """Room kept for a start that left the queue, until its loop is registered."""

    user_id: str | None
    held: bool = True


class TooManyConversations(ResourceExhausted):
    reason = "TOO_MANY_CONVERSATIONS"

    def __init__(self, limit: int, running: Sequence[str], why: str) -> None:
        super().__init__(
            f"the user already runs {len(running)} conversations (the limit is {limit}); {why}",
            metadata={"limit": str(limit), "running_conversation_ids": ",".join(running)},
        )


def victims_for(
    policy: AdmissionPolicy,
    limit: int,
    running: Sequence[tuple[str, float, str]],
    reserved: int,
) -> list[str]:
    """The conversations a start must stop before it runs.

    ``running``: the user's loops that are not already closing, as (id, last active time,
    agent state). Raises :class:`TooManyConversations` when the policy forbids what room
    needs.
    """
    excess = len(running) + reserved - limit + 1
    if excess <= 0:
        return []
    oldest_first = sorted(running, key=lambda item: item[1])
    ids = sorted(cid for cid, _, _ in running)
    if policy is AdmissionPolicy.EVICT_OLDEST:
        return [cid for cid, _, _ in oldest_first[:excess]]
    if policy is AdmissionPolicy.EVICT_IDLE_ONLY:
        idle = [cid for cid, _, state in oldest_first if state != "running"]
        if len(idle) >= excess:
            return idle[:excess]
        raise TooManyConversations(
            limit, ids, "their agents are running and this policy never stops a running agent"
        )
    raise TooManyConversations(limit, ids, "this policy stops none of them; close one first")


class AdmissionQueues:
    """Per user, the starts waiting for room, first come first served."""

    def __init__(
        self,
        room: Callable[[str | None], int],
        on_moved: Callable[[QueuedStart, int], None],
    ) -> None:
        """``room(user)``: how many more loops the user may run now (reservations aside);
        ``on_moved(entry, position)``: a waiting entry moved (told once per turn of the
        event loop, however many moves it made in it)."""
        self._room = room
        self._on_moved = on_moved
        self._moved_users: set[str | None] = set()
        self._queues: defaultdict[str | None, list[QueuedStart]] = defaultdict(list)
        self._by_conversation: dict[str, QueuedStart] = {}
        self._reserved: defaultdict[str | None, int] = defaultdict(int)

    def queued(self, conversation_id: str) -> QueuedStart | None:
        return self._by_conversation.get(conversation_id)

    def position(self, entry: QueuedStart) -> int:
        return self._queues[entry.user_id].index(entry) + 1

    def all_queued(self) -> list[QueuedStart]:
        return list(self._by_conversation.values())

    def reserved(self, user_id: str | None) -> int:
        return self._reserved.get(user_id, 0)

    def must_wait(self, user_id: str | None) -> bool:
        return bool(self._queues.get(user_id)) or self._free(user_id) <= 0

    def enqueue(self, entry: QueuedStart, *, first: bool = False) -> None:
        queue = self._queues[entry.user_id]
        queue.insert(0 if first else len(queue), entry)
        self._by_conversation[entry.conversation_id] = entry
        entry.published_position = 1 if first else len(queue)
        if first and len(queue) > 1:
            self._moved(entry.user_id)

    async def wait(self, entry: QueuedStart, timeout: float) -> Reservation:
        """Waits until ``entry`` is first and its user has room; then it leaves the queue
        holding a reservation. Raises DeadlineExceeded after ``timeout`` seconds (a call's
        deadline cancels the wait sooner); the entry leaves the queue either way."""
        queue = self._queues[entry.user_id]
        try:
            async with asyncio.timeout(timeout):
                while not (queue[0] is entry and self._free(entry.user_id) > 0):
                    entry.wakeup.clear()
                    await entry.wakeup.wait()
        except TimeoutError:
            raise DeadlineExceeded(
                f"no room for conversation {entry.conversation_id} within {timeout:g} s of "
                "waiting in the admission queue",
                reason="ADMISSION_QUEUE_TIMEOUT",
                metadata={"conversation_id": entry.conversation_id},
            ) from None
        finally:
            self._leave(entry)
        if self._free(entry.user_id) > 0:
            self._reserved[entry.user_id] += 1
            entry.admitted = True
            return Reservation(entry.user_id)
        raise AssertionError("unreachable: room was checked without an await")

    def release(self, reservation: Reservation | None) -> None:
        """Gives back a reservation (its loop was registered, or the start failed)."""
        if reservation is None or not reservation.held:
            return
        reservation.held = False
        user = reservation.user_id
        self._reserved[user] -= 1
        if not self._reserved[user]:
            del self._reserved[user]
        self.room_freed(user)

    def room_freed(self, user_id: str | None) -> None:
        queue = self._queues.get(user_id)
        if queue:
            queue[0].wakeup.set()

    def _free(self, user_id: str | None) -> int:
        return self._room(user_id) - self.reserved(user_id)

    def _leave(self, entry: QueuedStart) -> None:
        queue = self._queues[entry.user_id]
        index = queue.index(entry)
        del queue[index]
        del self._by_conversation[entry.conversation_id]
        if not queue:
            del self._queues[entry.user_id]
        entry.left.set()
        if index < len(queue):
            self._moved(entry.user_id)
        self.room_freed(entry.user_id)

    def _moved(self, user_id: str | None) -> None:
        """Tells of the user's new positions once this turn of the event loop ends: when
        many starts leave at once (deadlines, a burst of cancels), each entry that moved is
        told once, not once per start ahead of it that left."""
        if not self._moved_users:
            asyncio.get_running_loop().call_soon(self._tell_positions)
        self._moved_users.add(user_id)

    def _tell_positions(self) -> None:
        users, self._moved_users = self._moved_users, set()
        for user in users:
            for position, entry in enumerate(self._queues.get(user, ()), start=1):
                if entry.published_position != position:
                    entry.published_position = position
                    self._on_moved(entry, position)


_STOPS = {
    AdmissionPolicy.REJECT: 0,
    AdmissionPolicy.QUEUE: 0,
    AdmissionPolicy.EVICT_IDLE_ONLY: 1,
    AdmissionPolicy.EVICT_OLDEST: 2,
}
"""How much of a user's work a policy may stop to make room."""


class Admission:
    """The per-user limit on this node: which policy a start follows, what it must stop,
    and the queue of starts waiting for room. (In a cluster the claim in the database keeps
    the limit across nodes: see convsvc.cluster.node.)"""

    def __init__(
        self,
        config: EngineConfig,
        store: ConversationStore,
        registry: RuntimeRegistry,
        changes: ChangeFeed,
    ) -> None:
        self._config = config
        self._store = store
        self._registry = registry
        self._changes = changes
        self.queues = AdmissionQueues(self._room, self._queue_moved)
        self.clustered = False

    def policy(self, requested: AdmissionPolicy | None) -> AdmissionPolicy:
        """The policy a start follows: the one it names, else the server's. A start may not
        stop more than the server's policy would, unless the operator allows it."""
        server = self._config.admission_policy
        policy = requested or server
        if _STOPS[policy] > _STOPS[server] and not self._config.allow_admission_policy_override:
            raise FailedPrecondition(
                f"this server's admission policy is {server.value}: a start may not ask for "
                f"{policy.value}, which stops more (the operator may allow it with "
                "CONVSVC_ENGINE__ALLOW_ADMISSION_POLICY_OVERRIDE)",
                reason="ADMISSION_POLICY_OVERRIDE_NOT_ALLOWED",
                metadata={"field": "admission_policy", "server_policy": server.value},
            )
        if self.clustered and policy is not AdmissionPolicy.EVICT_OLDEST:
            raise Unimplemented(
                f"admission policy {policy.value} is not available in clustered mode "
                "(only evict_oldest is)",
                reason="ADMISSION_POLICY_NOT_SUPPORTED",
                metadata={"field": "admission_policy"},
            )
        return policy

    async def wait_for_room(
        self, cid: str, user: str | None, agent: str | None, first_in_line: bool
    ) -> Reservation | None:
        """Queues a start when its user has no room (or others wait already), until it is
        first and there is room; None when it need not wait.

        A start of a conversation that already waits goes in with it; if that one gives up,
        this one takes a place of its own in the queue (it has a deadline of its own)."""
        while True:
            already = self.queues.queued(cid)
            if already is not None:
                check_owner(cid, already.user_id, user)
                await already.left.wait()
                if already.admitted:
                    return None  # that start runs it (or fails): this one finds out in _start
                continue
            stored = await self._store.get_conversation(cid)
            if stored is not None:
                check_owner(cid, stored.user_id, user)
                user = stored.user_id
            if self._registry.running(cid) is not None:
                return None
            if not (first_in_line or self.queues.must_wait(user)):
                return None
            latest = await self._store.latest_event_id(cid) if stored else -1
            if self._registry.running(cid) is not None:
                return None  # started by another call while the store was read
            if self.queues.queued(cid) is not None:
                continue  # queued by another call while the store was read
            entry = QueuedStart(
                conversation_id=cid,
                user_id=user,
                agent=agent or (stored.agent if stored else self._config.default_agent),
                create_time=stored.create_time if stored is not None else datetime.now(UTC),
                latest_event_id=latest,
                is_new=stored is None,
            )
            return await self._wait_in_queue(entry, first_in_line)

    async def _wait_in_queue(self, entry: QueuedStart, first_in_line: bool) -> Reservation:
        self.queues.enqueue(entry, first=first_in_line)
        self._publish_queued(
            entry, ChangeKind.CREATED if entry.is_new else ChangeKind.STATUS_CHANGED
        )
        log.info(
            "conversation.queued", conversation_id=entry.conversation_id, user_id=entry.user_id
        )
        try:
            return await self.queues.wait(entry, self._config.queue_timeout_seconds)
        finally:
            if not entry.admitted:
                self._publish_queued(entry, ChangeKind.CLOSED)

    def victims(
        self, user: str | None, policy: AdmissionPolicy, reservation: Reservation | None
    ) -> list[ConversationRuntime]:
        """The user's loops a new one must stop to stay under the limit, as the policy
        allows (raises TooManyConversations when it does not)."""
        if self.clustered:  # the claim kept the limit
            return []
        registered = self._registry.ids_of_user(user)
        others_reserved = max(self.queues.reserved(user) - (1 if reservation else 0), 0)
        limit = self._config.max_concurrent_conversations
        if len(registered) + others_reserved < limit:
            return []  # room even counting loops still closing: nothing to look at
        mine = self._registry.of_user(user)
        chosen = set(
            victims_for(
                policy,
                limit,
                [(rt.conversation_id, rt.last_active, rt.agent_state) for rt in mine],
                others_reserved,
            )
        )
        return [rt for rt in mine if rt.conversation_id in chosen]

    def queued_view(self, entry: QueuedStart, position: int | None = None) -> ConversationView:
        """A queued start as callers see it (position 0: it left the queue)."""
        return ConversationView(
            conversation_id=entry.conversation_id,
            user_id=entry.user_id,
            agent=entry.agent,
            status=ConversationStatus.QUEUED if position != 0 else ConversationStatus.STOPPED,
            agent_state="",
            latest_event_id=entry.latest_event_id,
            create_time=entry.create_time,
            last_active_time=entry.create_time,
            connection_count=0,
            queue_position=self.queues.position(entry) if position is None else position,
            owner_address=self._registry.address if position != 0 else "",
        )

    def _room(self, user: str | None) -> int:
        """How many more loops the user may run now (closing ones still count)."""
        return self._config.max_concurrent_conversations - len(self._registry.ids_of_user(user))

    def _queue_moved(self, entry: QueuedStart, position: int) -> None:
        self._publish_queued(entry, ChangeKind.QUEUE_POSITION_CHANGED, position)

    def _publish_queued(
        self, entry: QueuedStart, kind: ChangeKind, position: int | None = None
    ) -> None:
        if kind is ChangeKind.CLOSED:
            position = 0
        self._changes.publish(kind, WatchedConversation(self.queued_view(entry, position), ()))
