"""The one owner of every running conversation's phase changes: a start (its guard, the
lease, admission and evictions, registration, the first writes), a close (graceful, dropped
or handed over), and what the cluster asks (evictions for its limit, takeovers, drain).

A runtime moves STARTING -> RUNNING -> CLOSING -> CLOSED (see ``runtime``). Starts of one
conversation id run one at a time (the only await-spanning guard, held while the store is
read); every other move is made in one step without awaits. What takes time after such a
step (writing the start, shutting a loop down) runs in a task this owner keeps, so a caller
that gives up cannot leave a conversation half started or half closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import structlog

from convsvc import validation
from convsvc.agents import agent_state_changed
from convsvc.codec import status_update
from convsvc.config import EngineConfig
from convsvc.domain import (
    AdmissionPolicy,
    ConversationRecord,
    EventSource,
    JsonObject,
    Notification,
    WebhookEventType,
)
from convsvc.engine.admission import Admission, Reservation, TooManyConversations
from convsvc.engine.connections import ConnectionRegistry
from convsvc.engine.idempotency import RequestKey
from convsvc.engine.log import EventLog
from convsvc.engine.membership import Membership
from convsvc.engine.registry import RuntimeRegistry
from convsvc.engine.runtime import AgentFactories, ConversationRuntime, StartRequest
from convsvc.engine.subscriptions import Broadcaster
from convsvc.engine.visibility import Scope, check_owner, out_of_scope
from convsvc.engine.watch import ChangeFeed, ChangeKind
from convsvc.errors import AlreadyExists, FailedPrecondition, Unavailable
from convsvc.redaction import storable_settings
from convsvc.storage import (
    ConversationLogError,
    ConversationStore,
    LogInterrupted,
    OwnerMoved,
    StorageError,
)
from convsvc.tasks import TaskOwner

log = structlog.get_logger(__name__)

TOO_MANY_CONVERSATIONS = "AGENT_ERROR$TOO_MANY_CONVERSATIONS"


class Lifecycle:
    """Starts and closes runs; everything that moves a runtime's phase goes through here."""

    def __init__(
        self,
        config: EngineConfig,
        store: ConversationStore,
        agents: AgentFactories,
        clock: Callable[[], float],
        registry: RuntimeRegistry,
        connections: ConnectionRegistry,
        broadcaster: Broadcaster,
        changes: ChangeFeed,
        admission: Admission,
    ) -> None:
        self._config = config
        self._store = store
        self._agents = agents
        self._clock = clock
        self._registry = registry
        self._connections = connections
        self._broadcaster = broadcaster
        self._changes = changes
        self._admission = admission
        self.log = EventLog(config, store, registry, broadcaster, changes, clock, self._log_broken)
        self.tasks = TaskOwner()
        self._start_guards: dict[str, tuple[asyncio.Lock, int]] = {}
        self.stopping = False
        """Set on shutdown or drain: no loop starts here any more."""
        self.membership: Membership | None = None
        """The cluster this node belongs to (None on its own)."""

    async def start(
        self,
        cid: str,
        user: str | None,
        agent_name: str | None,
        settings: JsonObject,
        first: list[JsonObject],
        key: RequestKey | None,
        start_request: StartRequest | None,
        policy: AdmissionPolicy,
        scope: Scope = None,
    ) -> tuple[ConversationRuntime, bool]:
        """The running runtime of ``cid``, started if needed under an admission policy (a
        ``queue`` start first waits for room), and whether the request id's answer was
        stored with the start.

        A start of another policy may take the room at the moment a queued one leaves the
        queue (OpenHands' evict_oldest starts at once); the queued start then waits again,
        first in line.
        """
        first_in_line = False
        while True:
            reservation = None
            if policy is AdmissionPolicy.QUEUE and self._registry.running(cid) is None:
                reservation = await self._admission.wait_for_room(
                    cid, user, agent_name, first_in_line
                )
            try:
                return await self._start(
                    cid,
                    user,
                    agent_name,
                    settings,
                    first,
                    key,
                    start_request,
                    policy=policy,
                    reservation=reservation,
                    scope=scope,
                )
            except TooManyConversations:
                if reservation is None:
                    raise
                first_in_line = True
            finally:
                self._admission.queues.release(reservation)

    @contextlib.asynccontextmanager
    async def _start_guard(self, cid: str) -> AsyncIterator[None]:
        """Starts of one conversation id run one at a time: each reads where the log ends
        and must register its runtime before another start reads it again."""
        lock, users = self._start_guards.get(cid) or (asyncio.Lock(), 0)
        self._start_guards[cid] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._start_guards[cid]
            if users == 1:
                del self._start_guards[cid]
            else:
                self._start_guards[cid] = (lock, users - 1)

    async def _start(
        self,
        cid: str,
        user: str | None,
        agent_name: str | None,
        settings: JsonObject,
        first: list[JsonObject],
        key: RequestKey | None,
        start_request: StartRequest | None = None,
        *,
        take_over: bool = False,
        policy: AdmissionPolicy | None = None,
        reservation: Reservation | None = None,
        scope: Scope = None,
    ) -> tuple[ConversationRuntime, bool]:
        """The running runtime of ``cid`` (started if needed) and whether the request id's
        answer was stored with the start. ``agent_name`` None: the conversation's own (the
        default for a new one). ``scope``: the conversations the start may stop to make room
        under the user's limit (a scoped token's); it is refused rather than stop others."""
        async with self._start_guard(cid):
            forking = start_request is not None and bool(start_request.history)
            if forking and self._registry.get(cid) is not None:
                raise _exists(cid)
            while (runtime := self._registry.get(cid)) is not None:
                check_owner(cid, runtime.record.user_id, user)
                if not runtime.closing:
                    return runtime, False
                await runtime.closed.wait()  # a close of the previous run is finishing
            self._check_not_stopping()
            stored = await self._store.get_conversation(cid)
            if stored is not None and forking:
                raise _exists(cid)
            if stored is not None:
                check_owner(cid, stored.user_id, user)
            agent = agent_name or (stored.agent if stored else self._config.default_agent)
            agent_factory = self._agents.get(agent)
            if (
                agent_factory is not None
                and agent_factory.numbers_own_events
                and start_request is not None
                and start_request.encoded_bytes > self._config.max_batch_bytes
            ):
                # Its loop gets the settings and the first events in one message.
                raise validation.too_large(
                    "replay_events",
                    f"{start_request.encoded_bytes} bytes with the settings and the first message",
                    self._config.max_batch_bytes,
                )
            if agent_factory is None:
                raise FailedPrecondition(
                    f"conversation {cid} runs agent {validation.shown(agent)!r}, which this "
                    "node cannot run now (no worker runs it)",
                    reason="UNKNOWN_AGENT",
                    metadata={"conversation_id": cid},
                )
            now_wall = datetime.now(UTC)
            asked = start_request or StartRequest()
            record = ConversationRecord(
                conversation_id=cid,
                user_id=stored.user_id if stored is not None else user,
                agent=agent,
                settings=storable_settings(settings),
                create_time=stored.create_time if stored is not None else now_wall,
                last_active_time=now_wall,
                labels=dict((stored or asked).labels),
                title=(stored or asked).title,
                running=True,
            )
            if self.membership is not None:
                # The lease first: from here no other node can append to this log, so the
                # end read next is the end.
                await self.membership.claim(record, take_over=take_over, may_stop=scope)
            try:
                # A record is always written before its conversation's first event.
                latest = await self._store.latest_event_id(cid) if stored is not None else -1
                latest = max(latest, len(asked.history) - 1)
                self._check_not_stopping()
            except BaseException:
                if self.membership is not None:  # claimed, but no loop runs it here
                    self.membership.lost(cid, readopt=not self.stopping)
                raise
            # From here to the end of the block nothing awaits: admission, evictions,
            # registration and the queueing of the start's writes happen in one step.
            victims = self._admission.victims(
                record.user_id, policy or self._config.admission_policy, reservation
            )
            for victim in victims:
                out_of_scope(scope, victim.conversation_id, f"starting {cid} would stop")
            self._store.clear_log_failure(cid)  # the end of the log was just read again
            runtime = ConversationRuntime(
                record,
                settings,
                agent_factory,
                self.log,
                self._now_running,
                next_event_id=latest + 1,
                now=self._clock(),
                start_request=start_request,
            )
            if runtime.agent.numbers_own_events:
                first = []  # the loop logs them itself, numbered as it goes
            for victim in victims:
                self.evict(victim)
            self._registry.add(runtime)
            try:
                saved = self._store.submit_conversation(
                    record, key.record({"conversation_id": cid}) if key else None, asked.history
                )
                durable = self.log.append(
                    runtime,
                    [(agent_state_changed("loading"), EventSource.ENVIRONMENT)]
                    + [(payload, EventSource.USER) for payload in first],
                    max_bytes=self._config.max_batch_bytes,
                )
            except BaseException:
                self._unregister(runtime)
                runtime.mark_closed()
                raise
            self._admission.queues.release(reservation)  # the loop now counts itself
            queued = reservation is not None
            self.publish_change(
                runtime,
                ChangeKind.CREATED if stored is None and not queued else ChangeKind.STATUS_CHANGED,
            )
            runtime.start_task = self.tasks.spawn(
                self._finish_start(runtime, victims, saved, durable), f"start:{cid}"
            )
        await asyncio.shield(runtime.start_task)
        return runtime, True

    def _check_not_stopping(self) -> None:
        if self.stopping:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")

    async def _finish_start(
        self,
        runtime: ConversationRuntime,
        victims: list[ConversationRuntime],
        saved: asyncio.Future[None],
        durable: asyncio.Future[None],
    ) -> None:
        try:
            await saved
            await durable
        except StorageError:
            self.begin_close(runtime)
            raise
        # The loops this start evicted stop before the new one runs, so no more than the
        # limit ever run at once. Each of them was registered before this one: no cycle.
        await asyncio.gather(
            *(victim.close_task for victim in victims if victim.close_task is not None),
            return_exceptions=True,
        )
        if runtime.launch():
            log.info(
                "conversation.started",
                conversation_id=runtime.conversation_id,
                user_id=runtime.record.user_id,
                agent=runtime.record.agent,
            )

    def _now_running(self, runtime: ConversationRuntime) -> None:
        """The loop finished starting."""
        if not runtime.closing:
            self.publish_change(runtime, ChangeKind.STATUS_CHANGED)

    def begin_close(
        self, runtime: ConversationRuntime, *, graceful: bool = True, hand_off: bool = False
    ) -> asyncio.Task[None]:
        """Moves a runtime to CLOSING and drops its connections at once; the rest of the
        close runs in an owned task (returned; the same one for every caller).

        ``graceful``: the log ends with ``stopped``; otherwise the loop is only dropped
        (its lease moved on, or ``hand_off``: it is handed to another node).
        """
        if runtime.close_task is None:
            runtime.begin_close()
            dropped = self._connections.remove_conversation(runtime.conversation_id)
            self.publish_change(runtime, ChangeKind.CLOSED)
            runtime.close_task = self.tasks.spawn(
                self._close_sequence(
                    runtime, graceful, hand_off, [c.connection_id for c in dropped]
                ),
                f"close:{runtime.conversation_id}",
            )
        return runtime.close_task

    async def _close_sequence(
        self,
        runtime: ConversationRuntime,
        graceful: bool,
        hand_off: bool,
        dropped_connections: list[str],
    ) -> None:
        cid = runtime.conversation_id
        try:
            if runtime.start_task is not None:
                # Its writes come first in the log; it does not launch a closing runtime.
                await asyncio.wait([runtime.start_task])
            await runtime.shutdown()
            if graceful:
                runtime.record.last_active_time = datetime.now(UTC)
                runtime.record.running = False
                try:
                    await self.log.append(
                        runtime, [(agent_state_changed("stopped"), EventSource.ENVIRONMENT)]
                    )
                    await self._store.save_conversation(
                        runtime.record,
                        notifications=[
                            Notification(
                                WebhookEventType.EVICTED
                                if runtime.evicted
                                else WebhookEventType.CLOSED,
                                cid,
                                runtime.record.user_id,
                                runtime.record.last_active_time,
                            )
                        ],
                    )
                except StorageError as exc:
                    log.warning(
                        "conversation.close_not_logged", conversation_id=cid, error=str(exc)
                    )
            if self.membership is not None and (graceful or hand_off):
                try:
                    await self.membership.release(cid, keep_running=hand_off)
                    if not hand_off:
                        await self.membership.connections_removed(dropped_connections)
                except StorageError as exc:
                    log.warning("conversation.release_failed", conversation_id=cid, error=str(exc))
        finally:
            self._unregister(runtime)
            runtime.mark_closed()
            # Streams that follow this node for the conversation's live events (other
            # nodes' followers) must find its new owner.
            self._broadcaster.fail_followers(
                cid,
                Unavailable(
                    f"conversation {cid} no longer runs on this node", reason="OWNER_MOVED"
                ),
            )
        log.info(
            "conversation.closed" if graceful else "conversation.dropped",
            conversation_id=cid,
            handed_off=hand_off,
        )

    def _unregister(self, runtime: ConversationRuntime) -> None:
        if self._registry.remove(runtime):
            self._admission.queues.room_freed(runtime.record.user_id)

    def _log_broken(self, runtime: ConversationRuntime, error: ConversationLogError) -> None:
        """A write conflicted with the stored log, leaving this run's ids unusable: the run
        ends (a new start continues after what is stored); other conversations go on."""
        if isinstance(error, OwnerMoved | LogInterrupted):
            # The lease moved on, or whether the write landed is unknown: nothing more may
            # be written by this run, not even ``stopped``.
            log.warning(
                "conversation.lost", conversation_id=runtime.conversation_id, error=str(error)
            )
            self.begin_close(runtime, graceful=False)
            if self.membership is not None:
                self.membership.lost(
                    runtime.conversation_id, readopt=isinstance(error, LogInterrupted)
                )
        else:
            log.error(
                "conversation.log_conflict_closed",
                conversation_id=runtime.conversation_id,
                error=str(error),
            )
            self.begin_close(runtime)

    def evict(self, victim: ConversationRuntime) -> asyncio.Task[None]:
        """Closes a loop to make room under the per-user limit, telling its viewers why."""
        limit = self._config.max_concurrent_conversations
        log.info(
            "conversation.evicted",
            conversation_id=victim.conversation_id,
            user_id=victim.record.user_id,
            limit=limit,
        )
        self._broadcaster.publish(
            victim.conversation_id,
            [
                status_update(
                    {
                        "status_update": True,
                        "type": "error",
                        "id": TOO_MANY_CONVERSATIONS,
                        "message": (
                            f"Too many conversations are running (the limit is {limit}); "
                            "this one was stopped to make room for a new one."
                        ),
                        "conversation_id": victim.conversation_id,
                    }
                )
            ],
        )
        victim.evicted = True
        return self.begin_close(victim)

    async def evict_here(self, conversation_id: str) -> bool:
        """Closes a loop running here for the per-user limit (a claim elsewhere asked);
        False when it does not run here."""
        runtime = self._registry.get(conversation_id)
        if runtime is None:
            return False
        if not runtime.closing:
            self.evict(runtime)
        await asyncio.shield(runtime.closed.wait())
        return True

    async def take_over(self, record: ConversationRecord) -> bool:
        """Starts, from its log, a conversation whose owner is gone (or handed it over);
        False when it was running here already (another call took it over first)."""
        _, started = await self._start(
            record.conversation_id,
            record.user_id,
            record.agent,
            record.settings,
            [],
            None,
            take_over=True,
        )
        return started

    async def hand_off_all(self) -> None:
        """Drain: every loop here stops without a ``stopped`` event and its lease is handed
        over, so another node continues it from the log at once."""
        self.stopping = True
        tasks = [
            self.begin_close(runtime, graceful=False, hand_off=True)
            for runtime in self._registry.all()
        ]
        await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

    def touch(self, runtime: ConversationRuntime) -> None:
        runtime.last_active = self._clock()
        runtime.last_active_time = datetime.now(UTC)

    def publish_change(self, runtime: ConversationRuntime, kind: ChangeKind) -> None:
        self._changes.publish(kind, self._registry.watched(runtime))


def _exists(cid: str) -> AlreadyExists:
    return AlreadyExists(
        f"conversation {cid} exists; fork into a new id",
        reason="CONVERSATION_EXISTS",
        metadata={"conversation_id": cid},
    )
