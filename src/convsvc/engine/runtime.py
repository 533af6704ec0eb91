"""One run of a conversation: its agent loop, the task that feeds it and its live state.

A runtime moves one way through STARTING -> RUNNING -> CLOSING -> CLOSED, and every move is
made without an await between the check and the change, so concurrent calls cannot both make
it. From CLOSING on, the loop can no longer append (``emit`` raises :class:`LoopClosed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog

from convsvc.agents import AgentFactory, agent_state_changed
from convsvc.domain import (
    ConversationRecord,
    ConversationStatus,
    Event,
    EventSource,
    IdempotencyRecord,
    JsonObject,
    PendingAction,
    StoredEvent,
)
from convsvc.engine.approvals import AWAITING_CONFIRMATION
from convsvc.errors import FailedPrecondition, InvalidArgument
from convsvc.tracing import continued, current_trace_parent

log = structlog.get_logger(__name__)


class RuntimeLog(Protocol):
    """What a runtime may do to its conversation's log (``convsvc.engine.log`` provides it)."""

    async def emit(
        self, runtime: ConversationRuntime, payload: JsonObject, source: EventSource
    ) -> int: ...

    async def flush_for(self, runtime: ConversationRuntime) -> None: ...

    def append_numbered(
        self,
        runtime: ConversationRuntime,
        first_id: int,
        events: Sequence[tuple[JsonObject, EventSource]],
        idempotency: IdempotencyRecord | None,
    ) -> asyncio.Future[None]: ...

    def read_history(
        self, runtime: ConversationRuntime, end_id: int
    ) -> AsyncIterator[list[StoredEvent]]: ...

    def publish_status(self, runtime: ConversationRuntime, status: JsonObject) -> None: ...


@dataclass(frozen=True)
class StartRequest:
    """What a start asked for beyond settings: a first message and events to replay."""

    initial_user_message: JsonObject | None = None
    replay_events: Sequence[JsonObject] = field(default_factory=tuple)
    encoded_bytes: int = 0
    """The settings' and the first user events' encoded size: a worker gets them in one
    message, so a start of a worker conversation must fit in one."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels and title for a conversation the start creates (an existing one keeps its)."""
    title: str = ""
    history: Sequence[Event] = ()
    """A fork's copied log (ids from 0), written with the new conversation's record."""


class Phase(enum.Enum):
    """Where a runtime is in its one-way life."""

    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class LoopClosed(FailedPrecondition):
    """The loop's conversation is closing: it can append nothing more."""

    reason = "CONVERSATION_NOT_RUNNING"


class EventOutOfSequence(InvalidArgument):
    """A loop that numbers its events sent an id that is not the log's next."""

    reason = "EVENT_ID_OUT_OF_SEQUENCE"

    def __init__(self, conversation_id: str, expected: int, got: int) -> None:
        super().__init__(
            f"event id {got} does not continue conversation {conversation_id}'s log: "
            f"the next id is {expected}",
            metadata={
                "conversation_id": conversation_id,
                "expected_id": str(expected),
                "got_id": str(got),
            },
        )


class ConversationRuntime:
    """The live part of a conversation; it exists only while its loop starts or runs.

    The engine creates it, moves it through its phases and owns the tasks that start and
    close it. The runtime owns exactly one task of its own: the one that starts the agent and
    then hands it user events one at a time, in log order.
    """

    def __init__(
        self,
        record: ConversationRecord,
        settings: Mapping[str, Any],
        agent_factory: AgentFactory,
        event_log: RuntimeLog,
        on_running: Callable[[ConversationRuntime], None],
        next_event_id: int,
        now: float,
        start_request: StartRequest | None = None,
    ) -> None:
        self.record = record
        self._settings = dict(settings)
        self._log = event_log
        self._on_running = on_running
        self._start_request = start_request or StartRequest()
        self.phase = Phase.STARTING
        self.agent_state = "loading"
        self.agent_state_event_id = -1
        """The id of the event that reported ``agent_state`` (-1: none committed yet)."""
        self.proposed_action: PendingAction | None = None
        """The newest action that awaits confirmation (shown while the agent waits for it)."""
        self.evicted = False
        """Closed to make room under its user's limit (webhooks tell it apart)."""
        self.deciding_action_id = -1
        """The pending action a ConfirmAction is deciding (a second decision is refused)."""
        self.next_event_id = next_event_id
        self.latest_event_id = next_event_id - 1
        """The newest committed id (``next_event_id`` runs ahead while appends are in flight)."""
        self.last_active = now
        self.last_active_time: datetime = record.last_active_time
        self.closed = asyncio.Event()
        self.start_task: asyncio.Task[None] | None = None
        self.close_task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[tuple[JsonObject, str]] = asyncio.Queue()
        self._state_waiters: list[tuple[Callable[[str], bool], asyncio.Future[str]]] = []
        self._start_trace = current_trace_parent()  # the call that started it
        self._task: asyncio.Task[None] | None = None
        self.agent = agent_factory(self)

    @property
    def closing(self) -> bool:
        """Whether the runtime is closing or closed (it then accepts nothing)."""
        return self.phase in (Phase.CLOSING, Phase.CLOSED)

    @property
    def pending_action(self) -> PendingAction | None:
        """The action awaiting confirmation, while the agent waits for a decision."""
        if self.agent_state != AWAITING_CONFIRMATION:
            return None
        return self.proposed_action

    @property
    def status(self) -> ConversationStatus:
        if self.phase is Phase.STARTING:
            return ConversationStatus.STARTING
        if self.phase is Phase.RUNNING:
            return ConversationStatus.RUNNING
        return ConversationStatus.STOPPED

    # AgentContext
    @property
    def conversation_id(self) -> str:
        return self.record.conversation_id

    @property
    def user_id(self) -> str:
        return self.record.user_id or ""

    @property
    def settings(self) -> Mapping[str, Any]:
        return self._settings

    async def emit(self, payload: JsonObject, source: EventSource) -> int:
        return await self._log.emit(self, payload, source)

    async def flush(self) -> None:
        await self._log.flush_for(self)

    @property
    def initial_user_message(self) -> JsonObject | None:
        return self._start_request.initial_user_message

    @property
    def replay_events(self) -> Sequence[JsonObject]:
        return self._start_request.replay_events

    def append_numbered(
        self,
        first_id: int,
        events: Sequence[tuple[JsonObject, EventSource]],
        idempotency: IdempotencyRecord | None = None,
    ) -> asyncio.Future[None]:
        return self._log.append_numbered(self, first_id, events, idempotency)

    def read_history(self, end_id: int) -> AsyncIterator[list[StoredEvent]]:
        return self._log.read_history(self, end_id)

    def publish_status(self, status: JsonObject) -> None:
        self._log.publish_status(self, status)

    # Engine side
    def deliver(self, event: JsonObject, trace_parent: str = "") -> None:
        """Queues a user event for the agent (in log order, possibly before it is durable),
        with the trace context of the call that sent it."""
        self._inbox.put_nowait((event, trace_parent))

    def report_agent_state(self, state: str, event_id: int) -> None:
        """The agent reported ``state`` in event ``event_id`` (committed): answers who waits
        for it."""
        self.agent_state = state
        self.agent_state_event_id = event_id
        if state != AWAITING_CONFIRMATION:
            self.proposed_action = None  # decided, or the agent moved on without a decision
        for answers, waiter in list(self._state_waiters):
            if not waiter.done() and answers(state):
                waiter.set_result(state)

    def agent_state_reported(self, answers: Callable[[str], bool]) -> asyncio.Future[str]:
        """The first state the agent reports from now on that ``answers`` accepts."""
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        entry = (answers, waiter)
        self._state_waiters.append(entry)
        waiter.add_done_callback(lambda _: self._state_waiters.remove(entry))
        return waiter

    def begin_close(self) -> bool:
        """Moves to CLOSING; False when it already was closing or closed."""
        if self.closing:
            return False
        self.phase = Phase.CLOSING
        for _, waiter in list(self._state_waiters):
            if not waiter.done():
                waiter.set_exception(
                    FailedPrecondition(
                        f"conversation {self.conversation_id} stopped before its agent answered",
                        reason="CONVERSATION_NOT_RUNNING",
                        metadata={"conversation_id": self.conversation_id},
                    )
                )
        return True

    def launch(self) -> bool:
        """Starts the agent's task unless the runtime began closing meanwhile."""
        if self.phase is not Phase.STARTING:
            return False
        # A context of its own: what the loop does belongs to the events it handles, not
        # to the call that happened to start it.
        self._task = asyncio.create_task(
            self._run(), name=f"agent:{self.conversation_id}", context=contextvars.Context()
        )
        return True

    async def shutdown(self) -> None:
        """Stops the task and lets the agent release what it holds."""
        if self._task is not None:
            self._task.cancel()
            # A task that died of an error has logged it already.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        try:
            await self.agent.stop()
        except Exception:
            log.exception("agent.stop_failed", conversation_id=self.conversation_id)

    def mark_closed(self) -> None:
        self.phase = Phase.CLOSED
        self.closed.set()

    def _span_attributes(self) -> dict[str, str]:
        return {"convsvc.conversation_id": self.conversation_id, "convsvc.agent": self.record.agent}

    async def _run(self) -> None:
        bound = log.bind(conversation_id=self.conversation_id, agent=self.record.agent)
        try:
            try:
                with continued(self._start_trace, "agent.start", **self._span_attributes()):
                    await self.agent.start()
            except LoopClosed:
                raise
            except Exception:
                bound.exception("agent.start_failed")
                await self.emit(agent_state_changed("error"), EventSource.ENVIRONMENT)
            if self.phase is Phase.STARTING:
                self.phase = Phase.RUNNING
                self._on_running(self)
            while True:
                event, trace_parent = await self._inbox.get()
                try:
                    with continued(trace_parent, "agent.user_event", **self._span_attributes()):
                        await self.agent.on_user_event(event)
                except LoopClosed:
                    raise
                except Exception:
                    # The loop stays up: OpenHands reports an agent error and waits for the user.
                    bound.exception("agent.event_failed", event_id=event.get("id"))
                    await self.emit(agent_state_changed("error"), EventSource.ENVIRONMENT)
        except LoopClosed:
            return  # the conversation is closing; its close cancels nothing more


AgentFactories = Mapping[str, AgentFactory]
"""The agents a conversation can run, by name (workers' kinds appear as they attach)."""
