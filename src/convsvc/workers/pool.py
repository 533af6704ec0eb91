"""The agent workers attached to this node, and which conversation runs on which.

A worker is a :class:`WorkerSession`: what it announced, the loops assigned to it and an
outbox of messages for it (the transport writes them to its Attach stream). The pool assigns
waiting loops to the least loaded worker that runs their kind, and detaches a worker that
goes silent, whose stream ends or that breaks the protocol: its loops then wait for another
worker, which restores them from the log.

Everything here runs on the event loop without awaits between reading and changing state,
so concurrent messages from several workers cannot interleave inside one decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from convsvc import validation
from convsvc.agents import AgentContext
from convsvc.config import WorkersConfig
from convsvc.domain import JsonObject, WorkerView
from convsvc.errors import (
    AlreadyExists,
    ConvsvcError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from convsvc.metrics import WorkerGauges
from convsvc.workers.messages import IncomingEvent, Outgoing, message_size

log = structlog.get_logger(__name__)

WAITING_STATUS = "STATUS$WAITING_FOR_AGENT_WORKER"
PACED_OUTBOX = 8
"""Messages a worker's outbox may hold before history pages wait for it to drain."""
MAX_KINDS = 32
"""Agent kinds one worker may announce."""


class AssignedLoop(Protocol):
    """What the pool needs of a conversation that runs on a worker (see ``workers.loop``)."""

    kind: str
    context: AgentContext

    @property
    def assignment(self) -> int:
        """The number of its current assignment (0: none)."""

    def assign(self, session: WorkerSession, number: int) -> None:
        """It runs on ``session`` from now on, as assignment ``number``."""

    def worker_lost(self, session: WorkerSession) -> None:
        """Its worker died, detached or failed it: it waits for another one."""

    def released(self, session: WorkerSession) -> None:
        """The worker confirmed it stopped the loop."""

    def accept(self, events: list[IncomingEvent]) -> asyncio.Future[None] | None:
        """Appends events the worker numbered; returns the last one's durability."""

    def completed(self, request_id: str, content: str, error: str) -> None:
        """The worker answered a completion request."""


@dataclass(eq=False)
class WorkerSession:
    """One attached worker."""

    worker_id: str
    kinds: frozenset[str]
    capacity: int
    last_heard: float
    loops: dict[str, AssignedLoop] = field(default_factory=dict)
    """Loops assigned here, by conversation id."""
    ended: set[tuple[str, int]] = field(default_factory=set)
    """Assignments convsvc took back from this worker: their late messages are dropped."""
    outbox: asyncio.Queue[Outgoing | ConvsvcError | None] = field(default_factory=asyncio.Queue)
    """Messages for the worker; an error or None ends its stream (detached)."""
    detached: bool = False
    max_unread: int = 10_000
    max_unread_bytes: int = 64 * 1024 * 1024
    on_overflow: Callable[[WorkerSession], None] | None = None
    """Called when the worker leaves ``max_unread`` messages or ``max_unread_bytes`` bytes
    unread (the pool detaches it)."""
    unread_bytes: int = 0
    _taken: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def free(self) -> int:
        return self.capacity - len(self.loops)

    def send(self, message: Outgoing) -> None:
        if self.detached:
            return
        size = message_size(message)
        over = self.outbox.qsize() >= self.max_unread or (
            self.unread_bytes and self.unread_bytes + size > self.max_unread_bytes
        )
        if over and self.on_overflow is not None:
            self.on_overflow(self)
            return
        self.unread_bytes += size
        self.outbox.put_nowait(message)

    async def send_paced(self, message: Outgoing) -> None:
        """Like ``send``, waiting first while the outbox is full (large histories)."""
        while self.outbox.qsize() >= PACED_OUTBOX and not self.detached:
            self._taken.clear()
            await self._taken.wait()
        self.send(message)

    async def next_outgoing(self) -> Outgoing | ConvsvcError | None:
        item = await self.outbox.get()
        if item is not None and not isinstance(item, ConvsvcError):
            self.unread_bytes -= message_size(item)
        self._taken.set()
        return item


class WorkerPool:
    """Attached workers and the loops waiting for one."""

    def __init__(
        self,
        config: WorkersConfig,
        reserved_kinds: Iterable[str],
        *,
        max_event_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.max_event_bytes = max_event_bytes
        self._reserved = frozenset(reserved_kinds)
        self._clock = clock
        self._sessions: dict[str, WorkerSession] = {}
        self._waiting: dict[AssignedLoop, None] = {}  # an ordered set: first come first
        self._assignments = itertools.count(1)
        self._configured_kinds = frozenset(config.kinds)
        self._watchdog: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- the pool's own lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch_silence(), name="worker-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for session in list(self._sessions.values()):
            self.detach(session, None)

    # -- workers -----------------------------------------------------------------------------

    def attach(self, worker_id: str, kinds: Iterable[str], capacity: int) -> WorkerSession:
        """Registers a worker that said hello; raises when its hello is not acceptable."""
        wid = validation.check_id("worker_id", worker_id)
        announced = frozenset(kinds)
        if not announced:
            raise InvalidArgument(
                "a worker must announce at least one agent kind",
                reason="WORKER_PROTOCOL_VIOLATION",
                metadata={"field": "agent_kinds"},
            )
        if len(announced) > MAX_KINDS:
            raise InvalidArgument(
                f"a worker may announce at most {MAX_KINDS} agent kinds (got {len(announced)})",
                reason="WORKER_PROTOCOL_VIOLATION",
                metadata={"field": "agent_kinds"},
            )
        for kind in announced:
            validation.check_id("agent_kinds", kind)
        reserved = sorted(announced & self._reserved)
        if reserved:
            raise InvalidArgument(
                f"agent kinds {', '.join(reserved)} are built into convsvc and run in-process; "
                "announce other names",
                reason="AGENT_KIND_RESERVED",
                metadata={"field": "agent_kinds"},
            )
        if capacity < 1:
            raise InvalidArgument(
                f"capacity must be at least 1 (got {capacity})",
                reason="WORKER_PROTOCOL_VIOLATION",
                metadata={"field": "capacity"},
            )
        if wid in self._sessions:
            raise AlreadyExists(
                f"a worker with id {wid} is already attached; choose a unique worker_id",
                reason="WORKER_ID_TAKEN",
                metadata={"worker_id": wid},
            )
        session = WorkerSession(
            wid,
            announced,
            capacity,
            self._clock(),
            max_unread=self.config.max_unread_messages,
            max_unread_bytes=self.config.max_unread_bytes,
            on_overflow=self._overflowed,
        )
        self._sessions[wid] = session
        log.info("worker.attached", worker_id=wid, kinds=sorted(announced), capacity=capacity)
        self._schedule()
        self._notify()
        return session

    def detach(self, session: WorkerSession, error: ConvsvcError | None) -> None:
        """Takes a worker out of service; its loops wait for another worker. ``error``, if
        any, is the status its stream ends with."""
        if session.detached:
            return
        session.detached = True
        if self._sessions.get(session.worker_id) is session:
            del self._sessions[session.worker_id]
        session.outbox.put_nowait(error)
        loops = list(session.loops.values())
        session.loops.clear()
        if error is not None:
            log.warning(
                "worker.detached",
                worker_id=session.worker_id,
                reason=error.reason,
                error=error.message,
                conversations=[loop.context.conversation_id for loop in loops],
            )
        else:
            log.info("worker.left", worker_id=session.worker_id)
        for loop in loops:
            loop.worker_lost(session)
        self._schedule()
        self._notify()

    def _notify(self) -> None:
        """Wakes everyone waiting in ``wait_until`` (attach, detach, assignment)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Returns once ``condition()`` holds after some change of the pool (readiness
        checks and tests); raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not condition():
                await self._changed.wait()

    def _overflowed(self, session: WorkerSession) -> None:
        self.detach(
            session,
            ResourceExhausted(
                f"worker {session.worker_id} left {session.outbox.qsize()} messages "
                f"({session.unread_bytes} bytes) unread; its conversations go to other workers",
                reason="WORKER_TOO_SLOW",
                metadata={"worker_id": session.worker_id},
            ),
        )

    def heard(self, session: WorkerSession) -> None:
        session.last_heard = self._clock()

    def slots(self) -> dict[str, tuple[int, int]]:
        """(capacity, free) of attached workers, by agent kind (a worker counts under each
        kind it runs)."""
        found: dict[str, tuple[int, int]] = {}
        for session in self._sessions.values():
            if session.detached:
                continue
            for kind in session.kinds:
                capacity, free = found.get(kind, (0, 0))
                found[kind] = (capacity + session.capacity, free + max(session.free, 0))
        return found

    def runs_kind(self, kind: str) -> bool:
        """Whether conversations of ``kind`` can start here: it is configured, an attached
        worker announced it, or a conversation of it waits or runs (a kind is forgotten
        with the last of these)."""
        return (
            kind in self._configured_kinds
            or any(kind in session.kinds for session in self._sessions.values())
            or any(loop.kind == kind for loop in self._waiting)
        )

    def kinds(self) -> set[str]:
        """Every kind ``runs_kind`` accepts."""
        found = set(self._configured_kinds)
        for session in self._sessions.values():
            found |= session.kinds
        found |= {loop.kind for loop in self._waiting}
        return found

    @property
    def waiting_count(self) -> int:
        """Loops waiting for a worker with room."""
        return len(self._waiting)

    def kinds_with_room(self) -> set[str]:
        """Agent kinds some attached worker has room for now."""
        return {
            kind
            for session in self._sessions.values()
            if not session.detached and session.free > 0
            for kind in session.kinds
        }

    def workers(self) -> Iterator[WorkerSession]:
        return iter(list(self._sessions.values()))

    def holder(self, conversation_id: str) -> str | None:
        """The id of the worker running a conversation, if one is."""
        held = self.assignment_of(conversation_id)
        return held[0] if held is not None else None

    def assignment_of(self, conversation_id: str) -> tuple[str, int] | None:
        """(worker id, assignment number) of the worker running a conversation, if one is."""
        for session in self._sessions.values():
            loop = session.loops.get(conversation_id)
            if loop is not None:
                return session.worker_id, loop.assignment
        return None

    def views(self) -> list[WorkerView]:
        """The attached workers and what each runs, by worker id."""
        return [
            WorkerView(
                worker_id=session.worker_id,
                kinds=tuple(sorted(session.kinds)),
                capacity=session.capacity,
                conversation_ids=tuple(sorted(session.loops)),
            )
            for session in sorted(self._sessions.values(), key=lambda s: s.worker_id)
            if not session.detached
        ]

    def gauges(self) -> WorkerGauges:
        """The attached workers and their slots now, for metrics."""
        return WorkerGauges(len(self._sessions), len(self._waiting), self.slots())

    async def _watch_silence(self) -> None:
        """Detaches silent workers; reminds waiting conversations' streams why they wait."""
        interval = self.config.ping_interval_seconds
        while True:
            await asyncio.sleep(interval)  # a periodic check, like the engine's idle cleanup
            for loop in list(self._waiting):
                self._announce_wait(loop)
            limit = self.config.silence_timeout_seconds
            now = self._clock()
            for session in list(self._sessions.values()):
                if now - session.last_heard > limit:
                    self.detach(
                        session,
                        DeadlineExceeded(
                            f"worker {session.worker_id} sent nothing for {limit:g}s; "
                            "its conversations go to other workers",
                            reason="WORKER_SILENT",
                            metadata={"worker_id": session.worker_id},
                        ),
                    )

    # -- loops -------------------------------------------------------------------------------

    def request(self, loop: AssignedLoop) -> None:
        """Queues a loop for the next worker of its kind with room."""
        self._waiting[loop] = None
        self._schedule()
        if loop not in self._waiting:
            return
        if not any(loop.kind in s.kinds for s in self._sessions.values()):
            log.warning(
                "worker.none_for_kind",
                conversation_id=loop.context.conversation_id,
                kind=loop.kind,
            )
        self._announce_wait(loop)

    def _announce_wait(self, loop: AssignedLoop) -> None:
        """Tells the conversation's streams why nothing happens yet (repeated by the
        watchdog, so a browser that connects later learns it too)."""
        runs_kind = any(loop.kind in s.kinds for s in self._sessions.values())
        loop.context.publish_status(
            {
                "status_update": True,
                "type": "info",
                "id": WAITING_STATUS,
                "message": (
                    f"Waiting for an agent worker with room for a {loop.kind} conversation"
                    if runs_kind
                    else f"Waiting for an agent worker that runs {loop.kind}"
                ),
            }
        )

    def withdraw(self, loop: AssignedLoop) -> None:
        self._waiting.pop(loop, None)

    def release(self, session: WorkerSession, loop: AssignedLoop, assignment: int) -> None:
        """Ends an assignment convsvc took back (stop, loss): the slot is free again."""
        conversation_id = loop.context.conversation_id
        session.ended.add((conversation_id, assignment))
        if session.loops.get(conversation_id) is loop:
            del session.loops[conversation_id]
        self._schedule()
        self._notify()

    def _schedule(self) -> None:
        for loop in list(self._waiting):
            candidates = [s for s in self._sessions.values() if loop.kind in s.kinds and s.free > 0]
            if not candidates:
                continue
            session = min(candidates, key=lambda s: (len(s.loops) / s.capacity, s.worker_id))
            del self._waiting[loop]
            number = next(self._assignments)
            session.loops[loop.context.conversation_id] = loop
            log.info(
                "worker.assigned",
                conversation_id=loop.context.conversation_id,
                worker_id=session.worker_id,
                assignment=number,
            )
            loop.assign(session, number)
            self._notify()

    # -- what workers say about loops --------------------------------------------------------

    def _loop_for(
        self, session: WorkerSession, conversation_id: str, assignment: int
    ) -> AssignedLoop | None:
        """The loop a message is about; None for an assignment convsvc already took back
        (late messages are normal after a stop); raises for one never given to this worker."""
        loop = session.loops.get(conversation_id)
        if loop is not None and loop.assignment == assignment:
            return loop
        if (conversation_id, assignment) in session.ended:
            return None
        raise FailedPrecondition(
            f"worker {session.worker_id} sent a message about conversation "
            f"{validation.shown(conversation_id)}, assignment {assignment}, which it does not "
            "hold",
            reason="WORKER_NOT_ASSIGNED",
            metadata={"worker_id": session.worker_id},
        )

    def on_events(
        self,
        session: WorkerSession,
        conversation_id: str,
        assignment: int,
        events: list[IncomingEvent],
    ) -> asyncio.Future[None] | None:
        """Appends a loop's events; returns the durability of the last one appended."""
        loop = self._loop_for(session, conversation_id, assignment)
        if loop is None:
            return None
        return loop.accept(events)

    def on_status(
        self, session: WorkerSession, conversation_id: str, assignment: int, status: JsonObject
    ) -> None:
        loop = self._loop_for(session, conversation_id, assignment)
        if loop is not None:
            loop.context.publish_status(status)

    def on_failed(
        self, session: WorkerSession, conversation_id: str, assignment: int, message: str
    ) -> None:
        loop = self._loop_for(session, conversation_id, assignment)
        if loop is None:
            return
        log.warning(
            "worker.loop_failed",
            conversation_id=conversation_id,
            worker_id=session.worker_id,
            message=validation.shown(message, 200),
        )
        del session.loops[conversation_id]
        session.ended.add((conversation_id, assignment))
        loop.worker_lost(session)
        self._schedule()

    def on_completion(
        self,
        session: WorkerSession,
        conversation_id: str,
        assignment: int,
        request_id: str,
        content: str,
        error: str,
    ) -> None:
        loop = self._loop_for(session, conversation_id, assignment)
        if loop is not None:
            loop.completed(request_id, content, error)

    def on_released(self, session: WorkerSession, conversation_id: str, assignment: int) -> None:
        loop = self._loop_for(session, conversation_id, assignment)
        if loop is not None:
            loop.released(session)
