"""WorkerAgentLoop: the engine's side of a conversation whose loop runs on an agent worker.

One writer at a time. While no worker holds the conversation, the engine writes its log
(``loading`` at start, ``stopped`` at close). Once assigned, the worker numbers every event,
user events included: a send is delivered unnumbered, the worker logs it in its own stream
(OpenHands' EventStream gives it the next id) and sends it back with its delivery id, and the
send is answered once that event is durable. The engine appends a worker's event only if its
id is the log's next, so ids never skip or repeat, and OpenHands' own ids (and the ``cause``
links between them) are what the browser sees.

A worker that dies loses nothing acknowledged: its conversation is assigned again and the new
worker starts from the log. Sends not yet logged are delivered again to the new worker.

Note the name: loops are plug-ins known by ``name``; this one runs any worker kind (``kind``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from convsvc.agents.base import AgentContext, AgentLoop, IdempotencyFor, agent_state_changed
from convsvc.domain import EventSource, JsonObject
from convsvc.engine.runtime import EventOutOfSequence, LoopClosed
from convsvc.errors import FailedPrecondition, InvalidArgument, Unavailable
from convsvc.storage import StorageError
from convsvc.tasks import TaskOwner
from convsvc.tracing import current_trace_parent, within
from convsvc.workers.messages import (
    AssignMessage,
    CompletionMessage,
    DeliverMessage,
    HistoryMessage,
    IncomingEvent,
    StopMessage,
)
from convsvc.workers.pool import WorkerPool, WorkerSession

log = structlog.get_logger(__name__)

_SOURCES = {source.value: source for source in EventSource}
_IGNORED_KEYS = ("id", "timestamp", "source")
NO_WORKER_STATUS = "AGENT_ERROR$NO_AGENT_WORKER"


@dataclass(eq=False)
class _Delivery:
    delivery_id: str
    payload: JsonObject
    idempotency: IdempotencyFor
    logged: asyncio.Future[tuple[int, asyncio.Future[None]]]
    trace_parent: str = ""
    """The trace of the call that sent it (see convsvc.tracing)."""
    sent_to: int = 0
    """The assignment it was delivered to (0: not delivered yet)."""
    payload_bytes: int = 0


@dataclass(eq=False)
class _Assignment:
    session: WorkerSession
    number: int
    ready: bool = False
    """The worker has the whole history: deliveries go straight to it."""
    handover: asyncio.Task[None] | None = None
    released: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class WorkerAgentLoop(AgentLoop):
    """Runs a conversation on whichever worker the pool assigns."""

    name = "worker"
    numbers_own_events = True

    def __init__(self, context: AgentContext, pool: WorkerPool, kind: str) -> None:
        super().__init__(context)
        self.kind = kind
        self._pool = pool
        self._current: _Assignment | None = None
        self._pending: dict[str, _Delivery] = {}
        self._by_request: dict[tuple[str, str], _Delivery] = {}
        """Deliveries by request id until durable: a retry after the caller gave up joins the
        delivery still on its way instead of sending the event twice."""
        self._stopping = False
        self._failures = 0
        self._gave_up = False
        self._first_message_logged = context.initial_user_message is None
        self._handling_trace = ""
        """The trace of the user event the worker logged last (what follows answers it)."""
        self._completions: dict[str, asyncio.Future[str]] = {}
        self._ready = asyncio.Event()
        """Set while a worker holds the loop and has its history."""
        self._tasks = TaskOwner()

    @property
    def assignment(self) -> int:
        return self._current.number if self._current is not None else 0

    # -- AgentLoop -------------------------------------------------------------------------

    async def start(self) -> None:
        self._pool.request(self)

    async def on_user_event(self, event: JsonObject) -> None:
        """Not used: user events reach the worker through ``submit_user_event``."""

    async def submit_user_event(
        self,
        payload: JsonObject,
        idempotency: IdempotencyFor,
        request: tuple[str, str] | None = None,
        *,
        payload_bytes: int = 0,
    ) -> int:
        if self._gave_up:  # a new message is worth another try
            self._gave_up = False
            self._failures = 0
            self._pool.request(self)
        delivery = self._by_request.get(request) if request is not None else None
        if delivery is None:
            delivery = _Delivery(
                uuid.uuid4().hex,
                payload,
                idempotency,
                asyncio.get_running_loop().create_future(),
                trace_parent=current_trace_parent(),
                payload_bytes=payload_bytes,
            )
            self._pending[delivery.delivery_id] = delivery
            if request is not None:
                self._by_request[request] = delivery
                delivery.logged.add_done_callback(lambda _: self._forget_later(request, delivery))
            current = self._current
            if current is not None and current.ready:
                self._deliver(current, delivery)
        try:
            event_id, durable = await asyncio.shield(delivery.logged)
        except asyncio.CancelledError:
            # Undelivered: withdrawn. Delivered: the worker will log it; keep its id known.
            if not delivery.sent_to and not delivery.logged.done():
                self._pending.pop(delivery.delivery_id, None)
                if request is not None and self._by_request.get(request) is delivery:
                    del self._by_request[request]
            raise
        await durable
        return event_id

    def _forget_later(self, request: tuple[str, str], delivery: _Delivery) -> None:
        """Forgets a request's delivery once its event is durable (the store answers retries
        from then on) or it failed."""

        def forget(_: object = None) -> None:
            if self._by_request.get(request) is delivery:
                del self._by_request[request]

        if delivery.logged.cancelled() or delivery.logged.exception() is not None:
            forget()
        else:
            delivery.logged.result()[1].add_done_callback(forget)

    async def complete(
        self, service_id: str, llm_config: JsonObject, messages: Sequence[JsonObject]
    ) -> str:
        """Asks the worker that runs the loop (waiting for one, within the caller's
        deadline); a worker lost meanwhile answers UNAVAILABLE, which may be retried."""
        request_id = uuid.uuid4().hex
        await self._ready.wait()
        current = self._current
        if current is None or self._stopping:
            raise Unavailable(
                f"conversation {self.context.conversation_id} has no agent worker now; retry",
                reason="NO_AGENT_WORKER",
            )
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._completions[request_id] = answer
        current.session.send(
            CompletionMessage(
                self.context.conversation_id,
                current.number,
                request_id,
                service_id,
                dict(llm_config),
                list(messages),
            )
        )
        try:
            return await asyncio.shield(answer)
        finally:
            self._completions.pop(request_id, None)

    def completed(self, request_id: str, content: str, error: str) -> None:
        answer = self._completions.get(request_id)
        if answer is None or answer.done():
            return  # its caller gave up
        if error:
            _fail(
                answer,
                FailedPrecondition(
                    f"the agent's LLM gave no answer: {error[:200]}", reason="LLM_FAILED"
                ),
            )
        else:
            answer.set_result(content)

    def _fail_completions(self) -> None:
        for answer in self._completions.values():
            _fail(
                answer,
                Unavailable(
                    "the agent worker was lost before it answered; retry", reason="WORKER_LOST"
                ),
            )

    async def stop(self) -> None:
        self._stopping = True
        self._pool.withdraw(self)
        current = self._current
        if current is not None:
            current.session.send(
                StopMessage(self.context.conversation_id, current.number),
            )
            timeout = self._pool.config.stop_timeout_seconds
            try:
                await asyncio.wait_for(asyncio.shield(current.released), timeout)
            except TimeoutError:
                log.warning(
                    "worker.release_timed_out",
                    conversation_id=self.context.conversation_id,
                    worker_id=current.session.worker_id,
                )
            self._end(current)
        for delivery in self._pending.values():
            _fail(
                delivery.logged,
                LoopClosed(f"conversation {self.context.conversation_id} was closed"),
            )
        self._pending.clear()
        await self._tasks.cancel_all()

    # -- what the pool calls ---------------------------------------------------------------

    def assign(self, session: WorkerSession, number: int) -> None:
        current = _Assignment(session, number)
        self._current = current
        current.handover = self._tasks.spawn(self._hand_over(current))

    def worker_lost(self, session: WorkerSession) -> None:
        """The worker died, detached or failed this loop: wait for another one."""
        current = self._current
        if current is None or current.session is not session:
            return
        self._end(current)
        for delivery in self._pending.values():
            delivery.sent_to = 0  # not logged by the lost worker: the next one gets it
        if self._stopping:
            return
        self._failures += 1
        if self._failures > self._pool.config.max_restarts:
            self._give_up()
        else:
            self._pool.request(self)

    def released(self, session: WorkerSession) -> None:
        current = self._current
        if current is not None and current.session is session and not current.released.done():
            current.released.set_result(None)

    def accept(self, events: list[IncomingEvent]) -> asyncio.Future[None] | None:
        """Appends a worker's events after checking the whole batch: consecutive ids from
        the log's next, known sources, OpenHands-shaped payloads, known delivery ids.

        Once the conversation is closing, a worker's events are late rather than wrong (it
        has not seen the StopLoop yet): they are dropped unchecked."""
        if self._stopping or self.context.closing:
            return None
        expected = self.context.next_event_id
        payloads: list[tuple[IncomingEvent, JsonObject, EventSource]] = []
        logged: set[str] = set()
        for offset, event in enumerate(events):
            if event.id != expected + offset:
                raise EventOutOfSequence(self.context.conversation_id, expected + offset, event.id)
            payloads.append((event, _checked_payload(event), _checked_source(event)))
            if event.delivery_id and (
                event.delivery_id not in self._pending or event.delivery_id in logged
            ):
                raise InvalidArgument(
                    f"event {event.id} names delivery {event.delivery_id[:40]!r}, which is "
                    "unknown or already logged",
                    reason="WORKER_PROTOCOL_VIOLATION",
                )
            logged.add(event.delivery_id)
        # Runs of events without a delivery go in one append (one encode loop, one commit
        # slot); an event that logs a delivery goes alone, with its send's idempotency record.
        durable: asyncio.Future[None] | None = None
        run: list[tuple[JsonObject, EventSource]] = []
        run_start = expected
        try:
            for event, payload, source in payloads:
                if not event.delivery_id:
                    if not run:
                        run_start = event.id
                    run.append((payload, source))
                    if source is EventSource.USER and payload.get("action") == "message":
                        self._first_message_logged = True
                    continue
                if run:
                    with within(self._handling_trace):
                        durable = self.context.append_numbered(run_start, run)
                    run = []
                delivery = self._pending.pop(event.delivery_id)
                # What the agent emits after a user event answers it: same trace (a worker
                # handles one user event at a time).
                self._handling_trace = delivery.trace_parent
                with within(self._handling_trace):
                    durable = self.context.append_numbered(
                        event.id, [(payload, source)], delivery.idempotency(event.id)
                    )
                if not delivery.logged.done():
                    delivery.logged.set_result((event.id, durable))
            if run:
                with within(self._handling_trace):
                    durable = self.context.append_numbered(run_start, run)
        except LoopClosed:
            return durable  # the conversation is closing: the rest is dropped
        if payloads:
            self._failures = 0
        return durable

    # -- internals -------------------------------------------------------------------------

    async def _hand_over(self, current: _Assignment) -> None:
        """Sends the assignment, then the history, then the sends waiting for a worker."""
        ctx = self.context
        end = ctx.next_event_id - 1
        first_run = not self._first_message_logged
        current.session.send(
            AssignMessage(
                conversation_id=ctx.conversation_id,
                assignment=current.number,
                agent_kind=self.kind,
                user_id=ctx.user_id,
                settings=ctx.settings,
                next_event_id=end + 1,
                initial_user_message=ctx.initial_user_message if first_run else None,
                replay_events=tuple(ctx.replay_events) if first_run else (),
            )
        )
        try:
            async for page in ctx.read_history(end):
                await current.session.send_paced(
                    HistoryMessage(
                        ctx.conversation_id, current.number, [event.encoded for event in page]
                    )
                )
        except StorageError as exc:
            log.error(
                "worker.history_unreadable", conversation_id=ctx.conversation_id, error=str(exc)
            )
            return
        if self._current is not current:
            return
        current.ready = True
        self._ready.set()
        for delivery in list(self._pending.values()):
            if not delivery.sent_to:
                self._deliver(current, delivery)

    def _deliver(self, current: _Assignment, delivery: _Delivery) -> None:
        delivery.sent_to = current.number
        current.session.send(
            DeliverMessage(
                self.context.conversation_id,
                current.number,
                delivery.delivery_id,
                delivery.payload,
                delivery.trace_parent,
                delivery.payload_bytes,
            )
        )

    def _end(self, current: _Assignment) -> None:
        if self._current is current:
            self._current = None
            self._ready.clear()
            self._fail_completions()
        if current.handover is not None and not current.handover.done():
            current.handover.cancel()
        if not current.released.done():
            current.released.set_result(None)
        self._pool.release(current.session, self, current.number)

    def _give_up(self) -> None:
        """Too many assignments failed in a row: report it and wait for the user."""
        self._gave_up = True
        cid = self.context.conversation_id
        log.error("worker.loop_gave_up", conversation_id=cid, kind=self.kind)
        self.context.publish_status(
            {
                "status_update": True,
                "type": "error",
                "id": NO_WORKER_STATUS,
                "message": (
                    f"The agent could not be started on a worker ({self._failures} attempts); "
                    "send a message to try again."
                ),
                "conversation_id": cid,
            }
        )
        self._tasks.spawn(self._report_error())

    async def _report_error(self) -> None:
        with contextlib.suppress(LoopClosed, StorageError):
            await self.context.emit(agent_state_changed("error"), EventSource.ENVIRONMENT)
        # Sends waiting for a worker would wait forever: they fail, and may be sent again.
        for delivery in list(self._pending.values()):
            if not delivery.sent_to and not delivery.logged.done():
                self._pending.pop(delivery.delivery_id, None)
                _fail(
                    delivery.logged,
                    Unavailable(
                        f"no agent worker could run conversation "
                        f"{self.context.conversation_id}; send again to retry",
                        reason="NO_AGENT_WORKER",
                        metadata={"conversation_id": self.context.conversation_id},
                    ),
                )


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    """Fails a future its caller may have stopped awaiting (the exception is marked read, so
    asyncio does not report it as lost)."""
    if not future.done():
        future.set_exception(error)
        future.exception()


def _checked_source(event: IncomingEvent) -> EventSource:
    source = _SOURCES.get(event.source)
    if source is None:
        raise InvalidArgument(
            f"event {event.id} has source {event.source[:40]!r}; "
            "expected agent, environment or user",
            reason="MALFORMED_WORKER_EVENT",
        )
    return source


def _checked_payload(event: IncomingEvent) -> JsonObject:
    payload = {k: v for k, v in event.payload.items() if k not in _IGNORED_KEYS}
    action, observation = payload.get("action"), payload.get("observation")
    if isinstance(action, str) and action and observation is None:
        return payload
    if isinstance(observation, str) and observation and action is None:
        return payload
    raise InvalidArgument(
        f'event {event.id} must hold exactly one non-empty string "action" or "observation"',
        reason="MALFORMED_WORKER_EVENT",
    )
