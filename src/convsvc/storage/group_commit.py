"""Group commit, shared by every backend: the queue of writes, the one writer task, and what a
failed commit means for each write.

A backend supplies :meth:`GroupCommitStore._write`, which commits a batch (one transaction,
one flush) and reports each write's outcome; everything the engine relies on lives here:
commits keep submission order, a write that conflicts with one conversation's log fails that
log only, callers are woken before subscribers, and the listener hears of commits in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from convsvc.domain import (
    AuditEntry,
    ConversationRecord,
    Event,
    EventKind,
    IdempotencyRecord,
    Notification,
)
from convsvc.metrics import Metrics
from convsvc.storage.base import (
    CommitListener,
    ConversationLogError,
    Durability,
    LogInterrupted,
    StorageError,
    StoreUnavailable,
)

log = structlog.get_logger(__name__)


AUDIT_LINGER_SECONDS = 0.05
"""How long audit entries wait for a commit to ride before they get one of their own."""
AUDIT_RETRY_SECONDS = 1.0
"""How often entries held through a database outage try again when nothing else commits."""
MAX_HELD_AUDIT = 100_000
"""The most audit entries held in memory while the database cannot be reached (the oldest
beyond it go to the log as ``audit.not_stored``)."""


@dataclass(slots=True)
class PendingWrite:
    """What one submission asked to commit atomically."""

    conversations: list[ConversationRecord] = field(default_factory=list)
    events: Sequence[Event] = ()
    requests: list[IdempotencyRecord] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    """Webhook notifications committed with the write (besides those its events make)."""
    copied: bool = False
    """Its events are a copy of another log (a fork): they notify nothing."""
    activity: dict[str, tuple[datetime, str | None]] = field(default_factory=dict)
    """Conversations' last activity and agent state (None: unchanged) to store with it."""
    epoch: int | None = None
    """The lease epoch the writer held when it submitted (clustered backends fence on it)."""
    done: Durability | None = None

    @property
    def log(self) -> str | None:
        """The conversation whose log this write extends (the engine appends to one at a
        time), or None."""
        if self.events:
            return self.events[0].conversation_id
        return None

    @property
    def target(self) -> str | None:
        """The conversation this write belongs to, log or record."""
        if self.events:
            return self.events[0].conversation_id
        if self.conversations:
            return self.conversations[0].conversation_id
        return None

    @property
    def empty(self) -> bool:
        return not (
            self.conversations or self.events or self.requests or self.audit or self.activity
        )


def activity(events: Sequence[Event]) -> dict[str, tuple[datetime, str | None]]:
    """Per conversation, the time of its newest event and the last agent state one reported
    (None: none did): what the store keeps on its conversations' rows for searches."""
    found: dict[str, tuple[datetime, str | None]] = {}
    for event in events:
        state = found.get(event.conversation_id, (event.timestamp, None))[1]
        if event.name == "agent_state_changed" and event.kind is EventKind.OBSERVATION:
            extras = event.payload.get("extras") or {}
            state = str(extras.get("agent_state", "")) or state
        found[event.conversation_id] = (event.timestamp, state)
    return found


WriteOutcome = Exception | None
"""None when the write committed; else why it did not (the rest of the batch committed)."""


class GroupCommitStore(ABC):
    """The write side of a store: submissions queued, committed in batches by one task."""

    name = "store"
    """How logs and errors name the backend."""

    def __init__(
        self, *, max_batch: int, metrics: Metrics | None, activity_interval: float = 1.0
    ) -> None:
        self._max_batch = max_batch
        self._activity_interval = activity_interval
        self._activity: dict[str, tuple[datetime, str | None]] = {}
        """Activity not stored yet, by conversation (see ``_take_activity``)."""
        self._activity_written: dict[str, float] = {}
        self._activity_timer: asyncio.TimerHandle | None = None
        metrics = metrics or Metrics()
        self._commit_seconds = metrics.commit_seconds.labels(self.name)
        self._commit_events = metrics.commit_events.labels(self.name)
        self._queue: asyncio.Queue[PendingWrite | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._listeners: list[CommitListener] = []
        self._failure: StorageError | None = None
        self._failed_logs: dict[str, ConversationLogError] = {}
        self._audit: list[AuditEntry] = []
        """Audit entries waiting for the next commit (no future of their own)."""
        self._audit_timer: asyncio.TimerHandle | None = None

    @abstractmethod
    async def _write(self, writes: list[PendingWrite]) -> list[WriteOutcome]:
        """Commits the writes in one transaction where it can and returns each one's outcome.

        Raises StoreUnavailable when the database could not be reached (nothing is known to
        have committed; the store stays open) and StorageError when the store is broken.
        """

    def _start_writer(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop(), name=f"{self.name}-writer")

    async def _stop_writer(self) -> None:
        if self._writer_task is not None:
            await self._queue.put(None)  # drains what is queued before it, then stops
            await self._writer_task
            self._writer_task = None

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    async def save_conversation(
        self,
        record: ConversationRecord,
        idempotency: IdempotencyRecord | None = None,
        notifications: Sequence[Notification] = (),
    ) -> None:
        await self.submit_conversation(record, idempotency, notifications=notifications)

    def submit_conversation(
        self,
        record: ConversationRecord,
        idempotency: IdempotencyRecord | None = None,
        events: Sequence[Event] = (),
        notifications: Sequence[Notification] = (),
    ) -> Durability:
        return self._submit(
            PendingWrite(
                conversations=[record],
                events=events,
                requests=[idempotency] if idempotency else [],
                notifications=list(notifications),
                copied=bool(events),
            )
        )

    def submit_events(
        self, events: Sequence[Event], idempotency: IdempotencyRecord | None = None
    ) -> Durability:
        return self._submit(
            PendingWrite(events=events, requests=[idempotency] if idempotency else [])
        )

    async def append_events(
        self, events: Sequence[Event], idempotency: IdempotencyRecord | None = None
    ) -> None:
        await self.submit_events(events, idempotency)

    def record_audit(self, entry: AuditEntry) -> None:
        """Adds an audit entry to the next commit, whatever else it holds: entries ride
        with the events of the calls around them, and cost no write of their own."""
        if self._failure is not None:
            raise self._failure
        if self._writer_task is None:
            raise StorageError("the store is closed")
        self._audit.append(entry)
        if self._audit_timer is None:
            # A busy writer takes them with its next batch (no commit, no fsync of their
            # own); an idle one commits them after a moment.
            self._audit_timer = asyncio.get_running_loop().call_later(
                AUDIT_LINGER_SECONDS, self._queue.put_nowait, PendingWrite()
            )

    def submit_idempotency(self, record: IdempotencyRecord) -> Durability:
        return self._submit(PendingWrite(requests=[record]))

    async def save_idempotency(self, record: IdempotencyRecord) -> None:
        await self.submit_idempotency(record)

    def _stamp(self, write: PendingWrite) -> None:
        """Adds what the backend needs to a write as it is submitted: a clustered backend
        stamps the lease epoch it fences on; a single node has nothing to fence."""
        write.epoch = None

    def clear_log_failure(self, conversation_id: str) -> None:
        self._failed_logs.pop(conversation_id, None)

    @property
    def failed(self) -> bool:
        """Whether a commit failed in a way that stops all writes."""
        return self._failure is not None

    def _submit(self, write: PendingWrite) -> Durability:
        if self._failure is not None:
            raise self._failure
        if self._writer_task is None:
            raise StorageError("the store is closed")
        if write.log is not None and write.log in self._failed_logs:
            raise self._failed_logs[write.log]
        self._stamp(write)
        done = Durability()
        write.done = done
        self._queue.put_nowait(write)
        return done

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            # One turn of the event loop before taking the batch: writes that this turn has
            # already set in motion (an agent answering the event just queued, the other
            # calls that arrived together) join this commit instead of waiting for the next.
            await asyncio.sleep(0)
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._take_audit(batch)
            self._take_activity(batch)
            await self._commit(batch)
        # What was audited last, and activity not stored yet, ride a final commit.
        final: list[PendingWrite] = []
        self._take_audit(final)
        self._take_activity(final, everything=True)
        if final:
            await self._commit(final)
        if self._audit_timer is not None:
            self._audit_timer.cancel()
            self._audit_timer = None
        for entry in self._audit:  # the database stayed away to the end: the log keeps them
            log.error("audit.not_stored", why="the store closed first", **_fields(entry))
        self._audit = []

    def _take_audit(self, batch: list[PendingWrite]) -> None:
        if self._audit_timer is not None:
            self._audit_timer.cancel()
            self._audit_timer = None
        if self._audit:
            batch.append(PendingWrite(audit=self._audit))
            self._audit = []

    def _hold_audit(self, entries: list[AuditEntry]) -> None:
        """Puts entries whose commit failed back in line, ahead of newer ones, and makes
        sure a commit retries them even if no other write comes."""
        if not entries:
            return
        self._audit[:0] = entries
        overflow = len(self._audit) - MAX_HELD_AUDIT
        if overflow > 0:
            for entry in self._audit[:overflow]:
                log.error("audit.not_stored", why="too many held in an outage", **_fields(entry))
            del self._audit[:overflow]
        if self._audit_timer is None and self._writer_task is not None:
            self._audit_timer = asyncio.get_running_loop().call_later(
                AUDIT_RETRY_SECONDS, self._queue.put_nowait, PendingWrite()
            )

    def _take_activity(self, batch: list[PendingWrite], *, everything: bool = False) -> None:
        """Stores each conversation's last activity and agent state (for searches) with
        the batch that logs its events, at most once per ``activity_interval`` per
        conversation: a busy conversation costs one row update a second, not one per commit.
        What is held back rides a later commit (a timer makes one when none comes)."""
        for write in batch:
            for cid, (moment, state) in activity(write.events).items():
                previous = self._activity.get(cid)
                self._activity[cid] = (moment, state or (previous[1] if previous else None))
        if not self._activity:
            return
        now = time.monotonic()
        due = {
            cid: pending
            for cid, pending in self._activity.items()
            if everything
            or now - self._activity_written.get(cid, -self._activity_interval)
            >= self._activity_interval
        }
        if due:
            batch.append(PendingWrite(activity=due))
            for cid in due:
                del self._activity[cid]
                self._activity_written[cid] = now
            if len(self._activity_written) > 2 * len(self._activity) + 10_000:
                # Forget conversations quiet for longer than the interval.
                self._activity_written = {
                    cid: at
                    for cid, at in self._activity_written.items()
                    if now - at < self._activity_interval
                }
        if self._activity and self._activity_timer is None and not everything:
            self._activity_timer = asyncio.get_running_loop().call_later(
                self._activity_interval, self._activity_due
            )

    def _activity_due(self) -> None:
        self._activity_timer = None
        self._queue.put_nowait(PendingWrite())  # a commit that takes what is due now

    async def _commit(self, batch: list[PendingWrite]) -> None:
        # Writes queued behind one that broke their conversation's log cannot commit: they
        # would leave a gap where the failed events should be.
        failed: list[tuple[PendingWrite, StorageError]] = []
        ready: list[PendingWrite] = []
        for write in batch:
            broken = self._failed_logs.get(write.log) if write.log is not None else None
            if broken is not None:
                failed.append((write, broken))
            else:
                ready.append(write)
        outcomes: list[WriteOutcome] = [None] * len(ready)
        try:
            if any(not write.empty for write in ready):  # else only a flush barrier
                began = time.perf_counter()
                outcomes = await self._write(ready)
                self._commit_seconds.observe(time.perf_counter() - began)
                self._commit_events.observe(sum(len(w.events) for w in ready))
        except StoreUnavailable as exc:
            # Whether the batch committed is unknown: its logs take no more writes until the
            # engine has re-read where they end; the store itself goes on. Audit entries
            # wait for the database (each has an id, so one that did commit is not stored
            # twice): an outage must not erase the record of the calls refused during it.
            log.error(f"{self.name}.unavailable", error=str(exc), batch=len(batch))
            self._hold_audit([a for w in ready for a in w.audit])
            ready = [w for w in ready if not (w.audit and w.done is None)]
            outcomes = [LogInterrupted(w.log, str(exc)) if w.log else exc for w in ready]
        except StorageError as exc:
            # Ids were assigned before the commit; carrying on would leave a gap in a log, so a
            # failed commit stops all further writes (the health check reports it).
            self._failure = exc
            log.error(f"{self.name}.commit_failed", error=str(exc), batch=len(batch))
            for write in batch:
                _fail(write, exc)
            return
        committed: list[PendingWrite] = []
        for write, outcome in zip(ready, outcomes, strict=True):
            if outcome is None:
                committed.append(write)
            else:
                failed.append((write, self._fail_log(write, outcome)))
        for write, error in failed:
            _fail(write, error)
        # Callers are woken before subscribers (both run only after the listener has updated
        # the live state): the unary answers leave first, and a client that awaits its answer
        # and then its stream reads the stream while the answer is being processed.
        for write in committed:
            if write.done is not None and not write.done.done():
                write.done.set_result(None)
            _settle(write, None)
        events = [e for w in committed for e in w.events]
        if events:
            for listener in self._listeners:
                try:
                    listener(events)
                except Exception:
                    # The events are durable; a listener bug must not stop the writer.
                    log.exception(f"{self.name}.listener_failed", batch=len(events))

    def _fail_log(self, write: PendingWrite, cause: Exception) -> StorageError:
        cid = write.log
        if cid is None:  # a conversation record or a request id: nothing to isolate
            if isinstance(cause, StorageError):
                return cause
            return StorageError(f"a write to the {self.name} conflicted: {cause}")
        error = self._failed_logs.get(cid)
        if error is None:
            if isinstance(cause, ConversationLogError):
                error = cause
            else:
                error = ConversationLogError(
                    cid, f"appending to conversation {cid} conflicted with its stored log: {cause}"
                )
            self._failed_logs[cid] = error
            log.error(f"{self.name}.log_failed", conversation_id=cid, error=str(error))
        return error


def _fields(entry: AuditEntry) -> dict[str, Any]:
    return {
        f"audit_{name}": value.isoformat() if isinstance(value, datetime) else value
        for name, value in dataclasses.asdict(entry).items()
        if value not in ("", 0)
    }


def _settle(write: PendingWrite, error: Exception | None) -> None:
    if isinstance(write.done, Durability) and not write.done.settled.done():
        write.done.settled.set_result(error)


def _fail(write: PendingWrite, error: StorageError) -> None:
    if write.done is None:  # audit entries riding the commit: nobody waits for them
        if write.audit:
            log.error("audit.not_stored", entries=len(write.audit), error=str(error))
        return
    if not write.done.done():
        write.done.set_exception(error)
    _settle(write, error)
