"""The event log of the conversations running here: numbering, encoding and queuing of their
events, and what happens once a batch is committed (live state updated, subscribers told).

Nothing between taking an id and queueing its event awaits, so however many appends run at
once a log has neither gaps nor reordering. Callers are answered and subscribers see events
only once they are durable, and because commits keep their order, what a loop appends in
answer to an event can never be durable without it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime

from convsvc import validation
from convsvc.codec import encode_event, status_update
from convsvc.config import EngineConfig
from convsvc.domain import (
    Event,
    EventKind,
    EventSource,
    IdempotencyRecord,
    JsonObject,
    StoredEvent,
)
from convsvc.engine.approvals import proposed_action
from convsvc.engine.registry import RuntimeRegistry
from convsvc.engine.runtime import ConversationRuntime, EventOutOfSequence, LoopClosed
from convsvc.engine.subscriptions import Broadcaster
from convsvc.engine.watch import ChangeFeed, ChangeKind
from convsvc.errors import InvalidArgument
from convsvc.storage import ConversationLogError, ConversationStore
from convsvc.storage.base import Durability
from convsvc.tracing import current_trace_parent

MAX_UNCOMMITTED_EMITS = 1000
"""Events a loop may have waiting for commit before its next emit waits for the disk."""

OnLogBroken = Callable[[ConversationRuntime, ConversationLogError], None]
"""Told when a run's writes conflicted with its stored log (the run must end)."""


class EventLog:
    """Appends to the logs of running conversations and fans out what commits."""

    def __init__(
        self,
        config: EngineConfig,
        store: ConversationStore,
        registry: RuntimeRegistry,
        broadcaster: Broadcaster,
        changes: ChangeFeed,
        clock: Callable[[], float],
        on_broken: OnLogBroken,
    ) -> None:
        self._config = config
        self._store = store
        self._registry = registry
        self._broadcaster = broadcaster
        self._changes = changes
        self._clock = clock
        self._on_broken = on_broken
        store.add_commit_listener(self._on_commit)

    # -- appending -------------------------------------------------------------------------

    def append(
        self,
        runtime: ConversationRuntime,
        payloads: Sequence[tuple[JsonObject, EventSource]],
        idempotency: IdempotencyRecord | None = None,
        *,
        max_bytes: int | None = None,
    ) -> Durability:
        """Gives events the next ids, encodes them and queues them for commit; hands user
        actions to the loop at once. Returns the future of their durability.

        The loop does not wait for each commit, so its answer can share the commit of the
        event it answers. An event whose encoding exceeds ``max_bytes`` is refused before
        anything is queued.
        """
        timestamp = datetime.now(UTC)
        stamp = timestamp.isoformat()
        trace_parent = current_trace_parent()  # the call's, or the user event's being handled
        first_id = runtime.next_event_id
        events: list[Event] = []
        for offset, (payload, source) in enumerate(payloads):
            event_id = first_id + offset
            full: JsonObject = {"id": event_id, "timestamp": stamp, "source": source.value}
            full.update(payload)
            if "action" in payload:
                kind, name = EventKind.ACTION, str(payload["action"])
            else:
                kind, name = EventKind.OBSERVATION, str(payload.get("observation", ""))
            event = Event(
                runtime.conversation_id,
                event_id,
                timestamp,
                source.value,
                kind,
                name,
                full,
                trace_parent=trace_parent,
            )
            event.encoded = encode_event(event)
            if max_bytes is not None and len(event.encoded) > max_bytes:
                raise InvalidArgument(
                    f"the event is {len(event.encoded)} bytes once encoded; "
                    f"the limit is {max_bytes}",
                    reason="PAYLOAD_TOO_LARGE",
                    metadata={"field": "event", "limit_bytes": str(max_bytes)},
                )
            events.append(event)
        durable = self._store.submit_events(events, idempotency)
        runtime.next_event_id = first_id + len(events)  # only once queued: a failure skips no id
        # On ``settled``: its outcome arrives even when the caller has left (and ``durable``
        # was cancelled with it).
        durable.settled.add_done_callback(lambda settled: self._after_append(runtime, settled))
        if not runtime.agent.numbers_own_events:
            for event in events:
                if event.source == EventSource.USER and event.kind is EventKind.ACTION:
                    runtime.deliver(event.payload, event.trace_parent)
        return durable

    # -- what a running loop may do (convsvc.engine.runtime.RuntimeLog) ----------------------

    async def emit(
        self, runtime: ConversationRuntime, payload: JsonObject, source: EventSource
    ) -> int:
        """Appends without waiting for durability: a failed store reaches the loop at its
        next emit or flush, and a conflicting log ends the run (see ``_after_append``)."""
        if runtime.next_event_id - 1 - runtime.latest_event_id >= MAX_UNCOMMITTED_EMITS:
            await self.flush()  # a loop that emits faster than the disk commits waits here
        if runtime.closing:
            raise LoopClosed(f"conversation {runtime.conversation_id} is closing")
        event_id = runtime.next_event_id
        self.append(runtime, [(payload, source)], max_bytes=self._config.max_batch_bytes)
        return event_id

    async def flush(self) -> None:
        """Returns once every event appended so far is durable."""
        await self._store.submit_events(())

    async def flush_for(self, runtime: ConversationRuntime) -> None:
        """Like ``flush``, and raises if the run's own log could not take its events (its
        conversation is then closing)."""
        await self.flush()
        if runtime.closing:
            raise LoopClosed(f"conversation {runtime.conversation_id} is closing")

    def append_numbered(
        self,
        runtime: ConversationRuntime,
        first_id: int,
        events: Sequence[tuple[JsonObject, EventSource]],
        idempotency: IdempotencyRecord | None,
    ) -> asyncio.Future[None]:
        """Events a loop numbered itself, appended only if they continue the log (one
        writer at a time: see workers.loop)."""
        if runtime.closing:
            raise LoopClosed(f"conversation {runtime.conversation_id} is closing")
        if first_id != runtime.next_event_id:
            raise EventOutOfSequence(runtime.conversation_id, runtime.next_event_id, first_id)
        return self.append(runtime, events, idempotency, max_bytes=self._config.max_batch_bytes)

    def publish_status(self, runtime: ConversationRuntime, status: JsonObject) -> None:
        """A transient status update to the conversation's live streams (not logged); it may
        be as large as a user event."""
        update = status_update(status)
        if len(update.encoded) > self._config.max_event_bytes:
            raise validation.too_large(
                "status", f"{len(update.encoded)} bytes once encoded", self._config.max_event_bytes
            )
        if not runtime.closing:
            self._broadcaster.publish(runtime.conversation_id, [update])

    async def read_history(
        self, runtime: ConversationRuntime, end_id: int
    ) -> AsyncIterator[list[StoredEvent]]:
        """What a loop must know before it continues the log."""
        await self.flush()
        async for page in self.read_range(
            runtime.conversation_id, 0, end_id, self._config.max_stream_batch
        ):
            yield page

    # -- reading ---------------------------------------------------------------------------

    async def read_range(
        self, conversation_id: str, start_id: int, end_id: int | None, batch: int
    ) -> AsyncIterator[list[StoredEvent]]:
        """Stored events of a range, in pages that each fit in one response."""
        next_id: int | None = start_id
        while next_id is not None:
            page = await self._store.read_page(
                conversation_id,
                next_id,
                end_id,
                limit=batch,
                max_bytes=self._config.max_batch_bytes,
            )
            if page.events:
                yield page.events
            next_id = page.next_id

    # -- after a commit ----------------------------------------------------------------------

    def _after_append(
        self, runtime: ConversationRuntime, settled: asyncio.Future[Exception | None]
    ) -> None:
        error = settled.result()
        if isinstance(error, ConversationLogError) and not runtime.closing:
            self._on_broken(runtime, error)

    def _on_commit(self, events: Sequence[Event]) -> None:
        """Told of every committed batch in commit order: updates live state and fans out to
        subscribers."""
        by_conversation: defaultdict[str, list[StoredEvent]] = defaultdict(list)
        now = self._clock()
        for event in events:
            by_conversation[event.conversation_id].append(StoredEvent(event.id, event.encoded))
            runtime = self._registry.get(event.conversation_id)
            if runtime is None:
                continue
            runtime.last_active = now
            runtime.last_active_time = event.timestamp
            runtime.latest_event_id = event.id
            if event.kind is EventKind.ACTION and event.source == "agent":
                self._note_action(runtime, event)
            elif event.name == "agent_state_changed" and event.kind is EventKind.OBSERVATION:
                extras = event.payload.get("extras") or {}
                state = str(extras.get("agent_state", runtime.agent_state))
                if state != runtime.agent_state:
                    runtime.report_agent_state(state, event.id)
                    if not runtime.closing:
                        self._changes.publish(
                            ChangeKind.AGENT_STATE_CHANGED, self._registry.watched(runtime)
                        )
        for cid, stored in by_conversation.items():
            self._broadcaster.publish(cid, stored)

    def _note_action(self, runtime: ConversationRuntime, event: Event) -> None:
        """An agent's action awaiting confirmation becomes the conversation's pending one."""
        proposed = proposed_action(event.id, event.payload)
        if proposed is None:
            return
        runtime.proposed_action = proposed
        if runtime.pending_action is not None and not runtime.closing:
            self._changes.publish(
                ChangeKind.PENDING_ACTION_CHANGED, self._registry.watched(runtime)
            )
