"""The conversation engine: the registry of running loops and the rules OpenHands keeps.

Independent of gRPC: the transport converts requests into calls on :class:`ConversationEngine`
and its domain results back into responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections import defaultdict
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from convsvc.agents import AgentLoop, agent_state_changed
from convsvc.codec import encode_event
from convsvc.config import EngineConfig
from convsvc.domain import (
    AdmissionPolicy,
    AuditEntry,
    AuditQuery,
    Connection,
    ConversationRecord,
    ConversationStatus,
    ConversationView,
    Event,
    EventKind,
    EventSource,
    IdempotencyRecord,
    JsonObject,
    StoredEvent,
)
from convsvc.engine import validation
from convsvc.engine.admission import (
    AdmissionQueues,
    QueuedStart,
    Reservation,
    TooManyConversations,
    victims_for,
)
from convsvc.engine.connections import ConnectionRegistry
from convsvc.engine.idempotency import RequestKey, RequestLedger
from convsvc.engine.membership import Membership
from convsvc.engine.paging import decode_token, encode_token
from convsvc.engine.runtime import (
    ConversationRuntime,
    EventOutOfSequence,
    LogAccess,
    LoopClosed,
    StartRequest,
)
from convsvc.engine.secrets import storable_settings
from convsvc.engine.subscriptions import Broadcaster, StreamItem, SubscriberTooSlow
from convsvc.engine.watch import ChangeFeed, ChangeKind, WatchedConversation, WatchUpdate
from convsvc.errors import (
    AlreadyExists,
    ConvsvcError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from convsvc.storage import (
    ConversationLogError,
    ConversationStore,
    LogInterrupted,
    OwnerMoved,
    StorageError,
)
from convsvc.tracing import current_trace_parent

log = structlog.get_logger(__name__)

TOO_MANY_CONVERSATIONS = "AGENT_ERROR$TOO_MANY_CONVERSATIONS"
_SERVER_SET_FIELDS = ("id", "timestamp", "source")
_MAX_UNCOMMITTED_EMITS = 1000
"""Events a loop may have waiting for commit before its next emit waits for the disk."""


def _retrieve_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclasses.dataclass(frozen=True)
class EngineGauges:
    conversations_by_status: dict[str, int]
    """By phase: starting, running, closing."""
    conversations_by_agent_state: dict[str, int]
    connections: int
    stream_subscribers: int
    stream_lag_events: int
    """The most events any live subscriber has waiting (how far the slowest is behind)."""
    watchers: int
    """WatchConversations streams reading this node's changes."""
    queued_starts: int
    """Starts waiting in the admission queue."""


class ConversationEngine:
    """Starts, joins, feeds, lists and closes conversations; streams their events.

    Lifecycle rules: starts of one conversation id run one at a time (the only await-spanning
    guard, held while the store is read); every other change of a runtime's phase (admission
    with its evictions, close, idle cleanup) is made in one step without awaits. What takes
    time after such a step (writing the start, shutting a loop down) runs in a task the engine
    owns, so a caller that gives up cannot leave a conversation half started or half closed.
    """

    def __init__(
        self,
        config: EngineConfig,
        store: ConversationStore,
        agents: Mapping[str, Callable[[ConversationRuntime], AgentLoop]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._store = store
        self._agents = agents  # a live view: worker kinds appear as workers attach
        self._clock = clock
        self._runtimes: dict[str, ConversationRuntime] = {}
        self._by_user: defaultdict[str | None, set[str]] = defaultdict(set)
        """Running conversation ids by user: a user's list does not grow with others'."""
        self._connections = ConnectionRegistry()
        self._broadcaster = Broadcaster(
            config.subscriber_buffer_events, config.subscriber_buffer_bytes
        )
        self._ledger = RequestLedger(store)
        self._changes = ChangeFeed(config.watch_history, config.watch_max_lag)
        self._admission = AdmissionQueues(self._room, self._queue_moved)
        self._start_guards: dict[str, tuple[asyncio.Lock, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cleanup_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._membership: Membership | None = None
        self._log_access = LogAccess(
            self._emit,
            self._flush_for,
            self._append_numbered,
            self._read_history,
            self._publish_status,
            self._now_running,
        )
        store.set_commit_listener(self._on_commit)

    # -- lifecycle of the engine ---------------------------------------------------------

    def join_cluster(self, membership: Membership) -> None:
        """From now on leases decide which conversations run here (see convsvc.cluster)."""
        self._membership = membership

    async def start(self) -> None:
        """Starts the periodic cleanup (idle loops, silent client instances)."""
        self._cleanup_task = asyncio.create_task(self._cleanup_loop(), name="engine-cleanup")

    def end_streams(self) -> None:
        """Ends every event stream with UNAVAILABLE so clients resume elsewhere (shutdown)."""
        self._stopping = True
        shutting_down = Unavailable(
            "the server is shutting down; resume the stream on another server or later",
            reason="SHUTTING_DOWN",
        )
        self._broadcaster.fail_all(shutting_down)
        self._changes.end(shutting_down)

    async def stop(self) -> None:
        """Ends streams, stops cleanup and closes every loop; the store's owner flushes it."""
        self.end_streams()
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup_task
            self._cleanup_task = None
        for runtime in list(self._runtimes.values()):
            self._begin_close(runtime)
        while self._tasks:  # closes may still be finishing starts they wait for
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Runs ``work`` in a task the engine owns (awaited by ``stop``)."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve_outcome)  # its callers, if any, saw the error
        return task

    # -- start, join -----------------------------------------------------------------------

    async def start_conversation(
        self,
        *,
        conversation_id: str = "",
        user_id: str = "",
        agent: str = "",
        settings: JsonObject | None = None,
        initial_user_message: JsonObject | None = None,
        replay_events: Sequence[JsonObject] = (),
        request_id: str = "",
        admission_policy: AdmissionPolicy | None = None,
    ) -> ConversationView:
        """Starts a loop, or returns the running one (idempotent)."""
        user = validation.check_user_id(user_id)
        policy = self._policy(admission_policy)
        cid = validation.check_optional_id("conversation_id", conversation_id)
        agent_name = self._check_agent(agent)
        settings = settings or {}
        validation.check_size("settings", settings, self._config.max_event_bytes)
        first_events = self._first_events(initial_user_message, replay_events)
        start_request = StartRequest(
            first_events[0] if initial_user_message is not None else None, tuple(replay_events)
        )
        key = self._ledger.key(
            user,
            request_id,
            "StartConversation",
            {"conversation_id": cid, "agent": agent_name, "first": first_events},
        )
        started: list[ConversationRuntime] = []

        async def operation(key: RequestKey | None) -> tuple[JsonObject, bool]:
            runtime, stored = await self._admitted_start(
                cid or uuid.uuid4().hex,
                user,
                agent_name,
                settings,
                first_events,
                key,
                start_request,
                policy,
            )
            started.append(runtime)
            return {"conversation_id": runtime.conversation_id}, stored

        result = await self._ledger.run(key, operation)
        if started and not started[0].closing:
            return self._view(started[0])
        return await self.get_conversation(result["conversation_id"], user_id)

    def _policy(self, requested: AdmissionPolicy | None) -> AdmissionPolicy:
        policy = requested or self._config.admission_policy
        if self._membership is not None and policy is not AdmissionPolicy.EVICT_OLDEST:
            raise Unimplemented(
                f"admission policy {policy.value} is not available in clustered mode "
                "(only evict_oldest is)",
                reason="ADMISSION_POLICY_NOT_SUPPORTED",
                metadata={"field": "admission_policy"},
            )
        return policy

    async def _admitted_start(
        self,
        cid: str,
        user: str | None,
        agent_name: str,
        settings: JsonObject,
        first_events: list[JsonObject],
        key: RequestKey | None,
        start_request: StartRequest | None,
        policy: AdmissionPolicy,
    ) -> tuple[ConversationRuntime, bool]:
        """``_start`` under an admission policy: a ``queue`` start first waits for room.

        A start of another policy may take the room at the moment a queued one leaves the
        queue (OpenHands' evict_oldest starts at once); the queued start then waits again,
        first in line.
        """
        first_in_line = False
        while True:
            reservation = None
            if policy is AdmissionPolicy.QUEUE and not self.runs_here(cid):
                reservation = await self._wait_for_room(cid, user, agent_name, first_in_line)
            try:
                return await self._start(
                    cid,
                    user,
                    agent_name,
                    settings,
                    first_events,
                    key,
                    start_request,
                    policy=policy,
                    reservation=reservation,
                )
            except TooManyConversations:
                if reservation is None:
                    raise
                first_in_line = True
            finally:
                self._admission.release(reservation)

    async def _wait_for_room(
        self, cid: str, user: str | None, agent_name: str, first_in_line: bool
    ) -> Reservation | None:
        """Queues the start when its user has no room (or others wait already), until it
        is first and there is room; None when it need not wait."""
        already = self._admission.queued(cid)
        if already is not None:
            # The same conversation waits already: this start goes in with it.
            self._check_owner_id(cid, already.user_id, user)
            await already.left.wait()
            return None
        stored = await self._store.get_conversation(cid)
        if stored is not None:
            self._check_owner(stored, user)
            user = stored.user_id
        if not (first_in_line or self._admission.must_wait(user)) or self.runs_here(cid):
            return None
        if (already := self._admission.queued(cid)) is not None:  # queued while we read
            await already.left.wait()
            return None
        entry = QueuedStart(
            conversation_id=cid,
            user_id=user,
            agent=agent_name,
            create_time=stored.create_time if stored is not None else datetime.now(UTC),
            latest_event_id=await self._store.latest_event_id(cid) if stored else -1,
            is_new=stored is None,
        )
        if self.runs_here(cid) or self._admission.queued(cid) is not None:
            return None  # started or queued by another call while the log end was read
        self._admission.enqueue(entry, first=first_in_line)
        self._publish_queued(
            entry, ChangeKind.CREATED if entry.is_new else ChangeKind.STATUS_CHANGED
        )
        log.info("conversation.queued", conversation_id=cid, user_id=user)
        admitted = False
        try:
            reservation = await self._admission.wait(entry, self._config.queue_timeout_seconds)
            admitted = True
            return reservation
        finally:
            if not admitted:
                self._publish_queued(entry, ChangeKind.CLOSED)

    def _room(self, user: str | None) -> int:
        """How many more loops the user may run now (closing ones still count)."""
        return self._config.max_concurrent_conversations - len(self._by_user.get(user, ()))

    def _queue_moved(self, entry: QueuedStart, position: int) -> None:
        self._publish_queued(entry, ChangeKind.QUEUE_POSITION_CHANGED, position)

    def _queued_view(self, entry: QueuedStart, position: int | None = None) -> ConversationView:
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
            queue_position=self._admission.position(entry) if position is None else position,
        )

    def _publish_queued(
        self, entry: QueuedStart, kind: ChangeKind, position: int | None = None
    ) -> None:
        if kind is ChangeKind.CLOSED:
            position = 0
        self._changes.publish(kind, WatchedConversation(self._queued_view(entry, position), ()))

    def _check_owner_id(self, cid: str, owner: str | None, user: str | None) -> None:
        if user is not None and owner != user:
            raise self._not_found(cid)

    def _check_agent(self, agent: str) -> str:
        if not agent:
            return self._config.default_agent
        if agent not in self._agents:
            raise InvalidArgument(
                f"agent {validation.shown(agent)!r} is not installed; "
                f"available: {', '.join(sorted(self._agents))}",
                reason="UNKNOWN_AGENT",
                metadata={"field": "agent"},
            )
        return agent

    def _first_events(
        self, initial_user_message: JsonObject | None, replay_events: Sequence[JsonObject]
    ) -> list[JsonObject]:
        """The user events a start appends after ``loading``, each checked like a send."""
        limit = self._config.max_replay_events
        if len(replay_events) > limit:
            raise InvalidArgument(
                f"replay_events holds {len(replay_events)} events; the limit is {limit}",
                reason="TOO_MANY_REPLAY_EVENTS",
                metadata={"field": "replay_events", "limit": str(limit)},
            )
        first: list[JsonObject] = []
        if initial_user_message is not None:
            first.append(self._checked_user_payload("initial_user_message", initial_user_message))
        for replayed in replay_events:
            # A trajectory replays only what its user did; the agent produces the rest anew.
            if replayed.get("source") == "user" and isinstance(replayed.get("action"), str):
                first.append(self._checked_user_payload("replay_events", replayed))
        return first

    def _checked_user_payload(self, field: str, event: JsonObject) -> JsonObject:
        payload = self._user_payload(validation.check_user_event(event, field))
        validation.check_event_size(field, payload, self._config.max_event_bytes)
        return payload

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
        agent_name: str,
        settings: JsonObject,
        first_events: list[JsonObject],
        key: RequestKey | None,
        start_request: StartRequest | None = None,
        *,
        take_over: bool = False,
        policy: AdmissionPolicy | None = None,
        reservation: Reservation | None = None,
    ) -> tuple[ConversationRuntime, bool]:
        """The running runtime of ``cid`` (started if needed) and whether the request id's
        answer was stored with the start."""
        async with self._start_guard(cid):
            while (runtime := self._runtimes.get(cid)) is not None:
                self._check_owner(runtime.record, user)
                if not runtime.closing:
                    return runtime, False
                await runtime.closed.wait()  # a close of the previous run is finishing
            if self._stopping:
                raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
            stored = await self._store.get_conversation(cid)
            if stored is not None:
                self._check_owner(stored, user)
            now_wall = datetime.now(UTC)
            record = ConversationRecord(
                conversation_id=cid,
                user_id=stored.user_id if stored is not None else user,
                agent=agent_name,
                settings=storable_settings(settings),
                create_time=stored.create_time if stored is not None else now_wall,
                last_active_time=now_wall,
            )
            if self._membership is not None:
                # The lease first: from here no other node can append to this log, so the
                # end read next is the end.
                await self._membership.claim(record, take_over=take_over)
            try:
                # A record is always written before its conversation's first event.
                latest = await self._store.latest_event_id(cid) if stored is not None else -1
                if self._stopping:
                    raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
            except BaseException:
                if self._membership is not None:  # claimed, but no loop runs it here
                    self._membership.lost(cid, readopt=not self._stopping)
                raise
            # From here to the end of the block nothing awaits: admission, evictions,
            # registration and the queueing of the start's writes happen in one step.
            victims = self._victims(
                record.user_id, policy or self._config.admission_policy, reservation
            )
            self._store.clear_log_failure(cid)  # the end of the log was just read again
            runtime = ConversationRuntime(
                record,
                settings,
                self._agents[agent_name],
                self._log_access,
                next_event_id=latest + 1,
                now=self._clock(),
                start_request=start_request,
            )
            if runtime.agent.numbers_own_events:
                first_events = []  # the loop logs them itself, numbered as it goes
            self._register(runtime, victims)
            try:
                saved = self._store.submit_conversation(
                    record, key.record({"conversation_id": cid}) if key else None
                )
                durable = self._append(
                    runtime,
                    [(agent_state_changed("loading"), EventSource.ENVIRONMENT)]
                    + [(payload, EventSource.USER) for payload in first_events],
                    max_bytes=self._config.max_batch_bytes,
                )
            except BaseException:
                self._unregister(runtime)
                runtime.mark_closed()
                raise
            self._admission.release(reservation)  # the loop now counts itself
            queued = reservation is not None
            self._publish_change(
                runtime,
                ChangeKind.CREATED if stored is None and not queued else ChangeKind.STATUS_CHANGED,
            )
            runtime.start_task = self._spawn(
                self._finish_start(runtime, victims, saved, durable), f"start:{cid}"
            )
        await asyncio.shield(runtime.start_task)
        return runtime, True

    def _victims(
        self, user: str | None, policy: AdmissionPolicy, reservation: Reservation | None
    ) -> list[ConversationRuntime]:
        """The user's loops a new one must stop to stay under the per-user limit, as the
        admission policy allows (raises TooManyConversations when it does not)."""
        if self._membership is not None:  # in a cluster, the claim kept the limit
            return []
        registered = self._by_user.get(user, ())
        others_reserved = self._admission.reserved(user) - (1 if reservation else 0)
        limit = self._config.max_concurrent_conversations
        if len(registered) + max(others_reserved, 0) < limit:
            return []  # room even counting loops still closing: nothing to look at
        mine = [rt for cid in registered if not (rt := self._runtimes[cid]).closing]
        chosen = set(
            victims_for(
                policy,
                limit,
                [(rt.conversation_id, rt.last_active, rt.agent_state) for rt in mine],
                max(others_reserved, 0),
            )
        )
        return [rt for rt in mine if rt.conversation_id in chosen]

    def _register(self, runtime: ConversationRuntime, victims: list[ConversationRuntime]) -> None:
        """Registers a new runtime, closing ``victims`` first (each told why, exactly once)."""
        for victim in victims:
            self._evict(victim)
        self._runtimes[runtime.conversation_id] = runtime
        self._by_user[runtime.record.user_id].add(runtime.conversation_id)

    def _unregister(self, runtime: ConversationRuntime) -> None:
        cid = runtime.conversation_id
        if self._runtimes.get(cid) is runtime:
            del self._runtimes[cid]
            mine = self._by_user[runtime.record.user_id]
            mine.discard(cid)
            if not mine:
                del self._by_user[runtime.record.user_id]
            self._admission.room_freed(runtime.record.user_id)

    def _evict(self, victim: ConversationRuntime) -> asyncio.Task[None]:
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
            ],
        )
        return self._begin_close(victim)

    async def evict(self, conversation_id: str) -> bool:
        """Closes a loop running here for the per-user limit (a claim elsewhere asked);
        False when it does not run here."""
        runtime = self._runtimes.get(conversation_id)
        if runtime is None:
            return False
        if not runtime.closing:
            self._evict(runtime)
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

    def adopt_connections(self, connections: Sequence[Connection]) -> None:
        """Registers connections made through a node that no longer runs their
        conversation (their heartbeats count from now)."""
        now = self._clock()
        for connection in connections:
            runtime = self._runtimes.get(connection.conversation_id)
            if runtime is not None and not runtime.closing:
                self._connections.add(connection, now)
                self._connections_changed(connection.conversation_id)

    def local_connection(self, connection_id: str) -> Connection | None:
        return self._connections.get(connection_id)

    @property
    def default_agent(self) -> str:
        return self._config.default_agent

    def runs_here(self, conversation_id: str) -> bool:
        """Whether this node runs the conversation's loop (and so publishes its events)."""
        runtime = self._runtimes.get(conversation_id)
        return runtime is not None and not runtime.closing

    async def while_here(self, conversation_id: str) -> int | None:
        """Waits while this node runs the conversation's loop (it publishes the events
        itself meanwhile); returns the newest id it committed, or None when it does not run
        here."""
        runtime = self._runtimes.get(conversation_id)
        if runtime is None:
            return None
        await runtime.closed.wait()
        return runtime.latest_event_id

    def publish_followed(self, conversation_id: str, items: Sequence[StreamItem]) -> None:
        """Fans out events another node committed (see cluster.follow) to local streams."""
        self._broadcaster.publish(conversation_id, items)

    async def hand_off_all(self) -> None:
        """Drain: every loop here stops without a ``stopped`` event and its lease is handed
        over, so another node continues it from the log at once."""
        self._stopping = True
        tasks = [
            self._begin_close(runtime, graceful=False, hand_off=True)
            for runtime in list(self._runtimes.values())
        ]
        await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

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
            self._begin_close(runtime)
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

    async def join_conversation(
        self,
        *,
        conversation_id: str,
        connection_id: str,
        user_id: str = "",
        settings: JsonObject | None = None,
        client_instance_id: str = "",
        request_id: str = "",
    ) -> tuple[ConversationView, Connection]:
        """Registers a connection, starting the loop when it is not running."""
        cid = validation.check_id("conversation_id", conversation_id)
        conn_id = validation.check_id("connection_id", connection_id)
        instance = validation.check_optional_id("client_instance_id", client_instance_id)
        user = validation.check_user_id(user_id)
        settings = settings or {}
        validation.check_size("settings", settings, self._config.max_event_bytes)
        key = self._ledger.key(
            user, request_id, "JoinConversation", {"c": cid, "n": conn_id, "i": instance}
        )

        policy = self._policy(None)

        async def operation(key: RequestKey | None) -> tuple[JsonObject, bool]:
            runtime, _ = await self._admitted_start(
                cid, user, self._config.default_agent, settings, [], None, None, policy
            )
            # No await from here on: a close marks the runtime closing and drops its
            # connections in one step, so a connection is never left on a closed loop.
            if runtime.closing:
                raise Unavailable(
                    f"conversation {cid} was closed while joining; join again",
                    reason="CONVERSATION_CLOSED",
                )
            held = self._connections.get(conn_id)
            if held is not None and user is not None and held.user_id != user:
                raise AlreadyExists(
                    f"connection_id {conn_id} is in use by another user; "
                    "choose a new connection id",
                    reason="CONNECTION_ID_TAKEN",
                    metadata={"connection_id": conn_id},
                )
            connection = Connection(conn_id, cid, user, instance)
            self._connections.add(connection, self._clock())
            self._touch(runtime)
            if held is not None and held.conversation_id != cid:
                self._connections_changed(held.conversation_id)
            self._connections_changed(cid)
            if self._membership is not None:
                await self._membership.connection_added(connection)
            return {"conversation_id": cid, "connection_id": conn_id}, False

        await self._ledger.run(key, operation)
        view = await self.get_conversation(cid, user_id)
        return view, self._connections.get(conn_id) or Connection(conn_id, cid, user, instance)

    # -- send, disconnect, close -----------------------------------------------------------

    async def send_event(
        self,
        *,
        event: JsonObject,
        connection_id: str = "",
        conversation_id: str = "",
        user_id: str = "",
        request_id: str = "",
    ) -> tuple[str, int]:
        """Appends a user event and hands it to the loop; returns (conversation id, event id)."""
        user = validation.check_user_id(user_id)
        if bool(connection_id) == bool(conversation_id):
            raise InvalidArgument(
                "name exactly one target: connection_id or conversation_id",
                reason="INVALID_ARGUMENT",
                metadata={"field": "target"},
            )
        if connection_id:
            target = {"n": validation.check_id("connection_id", connection_id)}
        else:
            target = {"c": validation.check_id("conversation_id", conversation_id)}
        payload = self._user_payload(validation.check_user_event(event, "event"))
        key = self._ledger.key(user, request_id, "SendEvent", {**target, "e": payload})

        async def operation(key: RequestKey | None) -> tuple[JsonObject, bool]:
            cid = target.get("c") or self._connected_conversation(target["n"], user)
            runtime = await self._running(cid, user)
            if runtime.agent.numbers_own_events:
                event_id = await runtime.agent.submit_user_event(
                    payload,
                    lambda event_id: (
                        key.record({"conversation_id": cid, "event_id": event_id}) if key else None
                    ),
                    (key.scope, key.request_id) if key else None,
                )
                return {"conversation_id": cid, "event_id": event_id}, True
            # No await between finding the runtime running and queueing the event.
            result = {"conversation_id": cid, "event_id": runtime.next_event_id}
            durable = self._append(
                runtime,
                [(payload, EventSource.USER)],
                key.record(result) if key else None,
                max_bytes=self._config.max_event_bytes,
            )
            await durable
            return result, True

        result = await self._ledger.run(key, operation)
        return result["conversation_id"], int(result["event_id"])

    async def complete_with_agent_llm(
        self,
        *,
        conversation_id: str,
        user_id: str = "",
        service_id: str = "",
        llm_config: JsonObject | None = None,
        messages: Sequence[JsonObject] = (),
    ) -> str:
        """One completion from a running conversation's agent LLM (nothing is logged)."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        if not messages:
            raise InvalidArgument(
                "messages must hold at least one message",
                reason="INVALID_ARGUMENT",
                metadata={"field": "messages"},
            )
        validation.check_size("llm_config", llm_config or {}, self._config.max_event_bytes)
        validation.check_size(
            "messages", {"messages": list(messages)}, self._config.max_batch_bytes
        )
        runtime = await self._running(cid, user)
        return await runtime.agent.complete(service_id, llm_config or {}, list(messages))

    def _connected_conversation(self, conn_id: str, user: str | None) -> str:
        connection = self._connections.get(conn_id)
        if connection is None or (user is not None and connection.user_id != user):
            raise NotFound(
                f"connection {conn_id} is not joined to any conversation; join first",
                reason="CONNECTION_NOT_FOUND",
                metadata={"connection_id": conn_id},
            )
        return connection.conversation_id

    async def disconnect(
        self, *, connection_id: str, user_id: str = "", request_id: str = ""
    ) -> bool:
        """Removes a connection; False when it was already gone (idempotent)."""
        conn_id = validation.check_id("connection_id", connection_id)
        user = validation.check_user_id(user_id)
        key = self._ledger.key(user, request_id, "DisconnectConnection", {"n": conn_id})

        async def operation(key: RequestKey | None) -> tuple[JsonObject, bool]:
            connection = self._connections.get(conn_id)
            if connection is None or (user is not None and connection.user_id != user):
                return {"removed": False}, False
            self._connections.remove(conn_id)
            runtime = self._runtimes.get(connection.conversation_id)
            if runtime is not None:
                self._touch(runtime)  # idle cleanup counts from the last viewer leaving
            self._connections_changed(connection.conversation_id)
            if self._membership is not None:
                await self._membership.connections_removed([conn_id])
            log.info(
                "connection.removed",
                conversation_id=connection.conversation_id,
                connection_id=conn_id,
            )
            return {"removed": True}, False

        result = await self._ledger.run(key, operation)
        return bool(result["removed"])

    async def close_conversation(
        self, *, conversation_id: str, user_id: str = "", request_id: str = ""
    ) -> ConversationView:
        """Stops a loop and drops its connections (idempotent)."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        key = self._ledger.key(user, request_id, "CloseConversation", {"c": cid})

        async def operation(key: RequestKey | None) -> tuple[JsonObject, bool]:
            runtime = self._runtimes.get(cid)
            if runtime is None:
                await self._check_visible(cid, user)
            else:
                self._check_owner(runtime.record, user)
                await asyncio.shield(self._begin_close(runtime))
            return {"conversation_id": cid}, False

        await self._ledger.run(key, operation)
        return await self.get_conversation(cid, user_id)

    def _begin_close(
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
            self._publish_change(runtime, ChangeKind.CLOSED)
            runtime.close_task = self._spawn(
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
                try:
                    await self._append(
                        runtime, [(agent_state_changed("stopped"), EventSource.ENVIRONMENT)]
                    )
                    await self._store.save_conversation(runtime.record)
                except StorageError as exc:
                    log.warning(
                        "conversation.close_not_logged", conversation_id=cid, error=str(exc)
                    )
            if self._membership is not None and (graceful or hand_off):
                try:
                    await self._membership.release(cid, keep_running=hand_off)
                    if not hand_off:
                        await self._membership.connections_removed(dropped_connections)
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

    # -- reads -----------------------------------------------------------------------------

    async def get_conversation(self, conversation_id: str, user_id: str = "") -> ConversationView:
        """Returns a conversation, running or stopped."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        runtime = self._runtimes.get(cid)
        if runtime is not None:
            self._check_owner(runtime.record, user)
            return self._view(runtime)
        if (queued := self._admission.queued(cid)) is not None:
            self._check_owner_id(cid, queued.user_id, user)
            return self._queued_view(queued)
        record = await self._store.get_conversation(cid)
        if record is None:
            raise self._not_found(cid)
        self._check_owner(record, user)
        return ConversationView(
            conversation_id=cid,
            user_id=record.user_id,
            agent=record.agent,
            status=ConversationStatus.STOPPED,
            agent_state="stopped",
            latest_event_id=await self._store.latest_event_id(cid),
            create_time=record.create_time,
            last_active_time=record.last_active_time,
            connection_count=0,
        )

    def list_conversations(
        self,
        *,
        user_id: str = "",
        conversation_ids: Sequence[str] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[ConversationView], str]:
        """Running (and starting) conversations, by id, one page at a time."""

        def candidates(user: str | None, wanted: set[str]) -> Iterator[tuple[str, Any]]:
            if wanted:
                ids: Iterable[str] = wanted
            elif user is not None:
                ids = self._by_user.get(user, ())
            else:
                ids = self._runtimes
            for cid in ids:
                runtime = self._runtimes.get(cid)
                if (
                    runtime is not None
                    and not runtime.closing
                    and (user is None or runtime.record.user_id == user)
                ):
                    yield cid, runtime

        runtimes, token = self._page(
            "conversations", user_id, conversation_ids, page_size, page_token, candidates
        )
        return [self._view(runtime) for runtime in runtimes], token

    def list_connections(
        self,
        *,
        user_id: str = "",
        conversation_ids: Sequence[str] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Connection], str]:
        """Connections, by id, one page at a time."""

        def candidates(user: str | None, wanted: set[str]) -> Iterator[tuple[str, Any]]:
            for connection in self._connections.all():
                if (user is None or connection.user_id == user) and (
                    not wanted or connection.conversation_id in wanted
                ):
                    yield connection.connection_id, connection

        connections, token = self._page(
            "connections", user_id, conversation_ids, page_size, page_token, candidates
        )
        if user_id:
            # Which web process holds a connection is the service's business, not a user's:
            # an instance id is what keeps that process's connections alive.
            connections = [dataclasses.replace(c, client_instance_id=None) for c in connections]
        return connections, token

    def _page(
        self,
        kind: str,
        user_id: str,
        conversation_ids: Sequence[str],
        page_size: int,
        page_token: str,
        candidates: Callable[[str | None, set[str]], Iterator[tuple[str, Any]]],
    ) -> tuple[list[Any], str]:
        """One page of (key, item) candidates ordered by key; the token holds the last key."""
        user = validation.check_user_id(user_id)
        wanted = {validation.check_id("conversation_ids", c) for c in conversation_ids}
        size = self._page_size(page_size)
        query = [kind, user, sorted(wanted)]
        key = self._store.page_token_key
        after = decode_token(key, page_token, query, str) if page_token else ""
        matching = sorted(
            (item for item in candidates(user, wanted) if item[0] > after), key=lambda i: i[0]
        )
        page = matching[:size]
        token = encode_token(key, query, page[-1][0]) if len(matching) > size else ""
        return [item for _, item in page], token

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
        if start_id < 0:
            raise InvalidArgument(
                f"start_id must not be negative (got {start_id})",
                reason="INVALID_ARGUMENT",
                metadata={"field": "start_id"},
            )
        if end_id is not None and end_id < start_id:
            raise InvalidArgument(
                f"end_id ({end_id}) is below start_id ({start_id})",
                reason="INVALID_ARGUMENT",
                metadata={"field": "end_id"},
            )
        size = self._page_size(page_size)
        await self._check_visible(cid, validation.check_user_id(user_id))
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
        """
        cid = validation.check_id("conversation_id", conversation_id)
        if start_id < 0:
            raise InvalidArgument(
                f"start_id must not be negative (got {start_id}); use 0 for the whole log",
                reason="INVALID_ARGUMENT",
                metadata={"field": "start_id"},
            )
        if max_batch < 0:
            raise InvalidArgument(
                "max_batch_size must not be negative",
                reason="INVALID_ARGUMENT",
                metadata={"field": "max_batch_size"},
            )
        batch = min(max_batch or self._config.max_stream_batch, self._config.max_stream_batch)
        await self._check_visible(cid, validation.check_user_id(user_id))
        if self._stopping:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        max_bytes = self._config.max_batch_bytes
        if owner_only and not self.runs_here(cid):
            # Another node's follower: it must follow whoever runs the loop, not this node.
            raise Unavailable(f"conversation {cid} does not run on this node", reason="OWNER_MOVED")
        subscription = self._broadcaster.subscribe(cid, follower=owner_only)
        next_id = start_id
        try:
            async for page in self._read_range(cid, next_id, None, batch):
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
                        async for page in self._read_range(cid, next_id, item.id - 1, batch):
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

    async def _read_range(
        self, cid: str, start_id: int, end_id: int | None, batch: int
    ) -> AsyncIterator[list[StoredEvent]]:
        """Stored events of a range, in pages that each fit in one response."""
        next_id: int | None = start_id
        while next_id is not None:
            page = await self._store.read_page(
                cid, next_id, end_id, limit=batch, max_bytes=self._config.max_batch_bytes
            )
            if page.events:
                yield page.events
            next_id = page.next_id

    async def watch_conversations(
        self,
        *,
        user_id: str = "",
        conversation_ids: Sequence[str] = (),
        resume_token: str = "",
        resume_only: bool = False,
    ) -> AsyncIterator[WatchUpdate]:
        """A snapshot of the matching queued, starting and running conversations (or, with
        a token this feed can resume from, none), then every matching change.
        ``resume_only``: a token that cannot be resumed fails (RESUME_TOKEN_EXPIRED) instead
        of getting a snapshot (a cluster watch then asks every node for one)."""
        user = validation.check_user_id(user_id)
        wanted = {validation.check_id("conversation_ids", c) for c in conversation_ids}
        if self._stopping:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")

        def matches(watched: WatchedConversation) -> bool:
            view = watched.view
            return (user is None or view.user_id == user) and (
                not wanted or view.conversation_id in wanted
            )

        seq = self._changes.resumable_seq(resume_token) if resume_token else None
        resumed = seq is not None
        if seq is None and resume_only:
            raise FailedPrecondition(
                "this node can no longer resume from the token", reason="RESUME_TOKEN_EXPIRED"
            )
        if seq is None:
            # Taken in one step with the feed's position: no change falls between them.
            seq = self._changes.last_seq
            snapshot = [
                watched
                for runtime in self._runtimes.values()
                if not runtime.closing and matches(watched := self._watched(runtime))
            ]
            snapshot += [
                watched
                for entry in self._admission.all_queued()
                if matches(watched := WatchedConversation(self._queued_view(entry), ()))
            ]
            snapshot.sort(key=lambda w: w.view.conversation_id)
            yield WatchUpdate(snapshot, (), self._changes.token(seq))
        async for update in self._changes.changes_after(seq, matches, resumed=resumed):
            yield update

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
        size = self._page_size(page_size)
        query = ["audit", cid, user]
        key = self._store.page_token_key
        after = decode_token(key, page_token, query, int) if page_token else 0
        await self._flush()  # entries of calls already answered are committed behind them
        entries = await self._store.list_audit(AuditQuery(after, cid, user, size + 1))
        token = encode_token(key, query, entries[size - 1].sequence) if len(entries) > size else ""
        return entries[:size], token

    def heartbeat(self, client_instance_id: str) -> tuple[int, float]:
        """Keeps an instance's connections alive; returns (connections, ttl seconds)."""
        instance = validation.check_id("client_instance_id", client_instance_id)
        count = self._connections.heartbeat(instance, self._clock())
        return count, self._config.connection_ttl_seconds

    # -- cleanup -----------------------------------------------------------------------------

    async def run_cleanup_once(self) -> None:
        """Expires silent client instances' connections and closes idle loops."""
        now = self._clock()
        ttl = self._config.connection_ttl_seconds
        if self._membership is not None:
            # A client instance may heartbeat any node of the cluster.
            silent = self._connections.silent_instances(now, ttl)
            for instance in await self._membership.instances_alive(silent, ttl):
                self._connections.heartbeat(instance, now)
        expired = self._connections.expire_instances(now, ttl)
        for cid in sorted({c.conversation_id for c in expired}):
            self._connections_changed(cid)
        if self._membership is not None and expired:
            await self._membership.connections_removed([c.connection_id for c in expired])
        for connection in expired:
            log.info(
                "connection.expired",
                conversation_id=connection.conversation_id,
                connection_id=connection.connection_id,
                client_instance_id=connection.client_instance_id,
            )
        # Chosen and marked closing in one step: a join or send racing with the cleanup
        # either comes first (and the loop is no longer idle) or finds it closing.
        closes = [
            self._begin_close(rt)
            for rt in list(self._runtimes.values())
            if not rt.closing
            and rt.agent_state != "running"
            and self._connections.count_for_conversation(rt.conversation_id) == 0
            and now - rt.last_active > self._config.close_delay_seconds
        ]
        if closes:
            log.info("conversation.idle_closed", count=len(closes))
        await asyncio.gather(*(asyncio.shield(task) for task in closes), return_exceptions=True)
        cutoff = datetime.now(UTC) - timedelta(seconds=self._config.idempotency_ttl_seconds)
        await self._store.prune_idempotency(cutoff)

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.cleanup_interval_seconds)
            try:
                await self.run_cleanup_once()
            except Exception:
                log.exception("cleanup.failed")

    # -- the event log -----------------------------------------------------------------------

    async def _emit(
        self, runtime: ConversationRuntime, payload: JsonObject, source: EventSource
    ) -> int:
        """AgentContext.emit: appends without waiting for durability (see ``_append``)."""
        if runtime.next_event_id - 1 - runtime.latest_event_id >= _MAX_UNCOMMITTED_EMITS:
            await self._flush()  # a loop that emits faster than the disk commits waits here
        if runtime.closing:
            raise LoopClosed(f"conversation {runtime.conversation_id} is closing")
        event_id = runtime.next_event_id
        # Nobody awaits the durability here: a failed store reaches the loop at its next emit
        # or flush, and a conflicting log closes the conversation (see ``_append``).
        self._append(runtime, [(payload, source)], max_bytes=self._config.max_batch_bytes)
        return event_id

    async def _flush(self) -> None:
        """Returns once every event appended so far is durable."""
        await self._store.submit_events(())

    async def _flush_for(self, runtime: ConversationRuntime) -> None:
        """AgentContext.flush: like ``_flush``, and raises if the loop's own log could not
        take its events (its conversation is then closing)."""
        await self._flush()
        if runtime.closing:
            raise LoopClosed(f"conversation {runtime.conversation_id} is closing")

    def _append(
        self,
        runtime: ConversationRuntime,
        payloads: Sequence[tuple[JsonObject, EventSource]],
        idempotency: IdempotencyRecord | None = None,
        *,
        max_bytes: int | None = None,
    ) -> asyncio.Future[None]:
        """Gives events the next ids, encodes them and queues them for commit; hands user
        actions to the loop at once. Returns the future of their durability.

        Nothing here awaits, so ids are taken and queued in one step: however many appends run
        concurrently, the log has neither gaps nor reordering. Callers are answered and
        subscribers see events only once they are durable, and because commits keep their
        order, what a loop appends in answer to an event can never be durable without it. The
        loop does not wait for each commit, so its answer can share the commit of the event.
        An event whose encoding exceeds ``max_bytes`` is refused before anything is queued.
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
        durable.add_done_callback(lambda done: self._after_append(runtime, done))
        if not runtime.agent.numbers_own_events:
            for event in events:
                if event.source == EventSource.USER and event.kind is EventKind.ACTION:
                    runtime.deliver(event.payload, event.trace_parent)
        return durable

    def _append_numbered(
        self,
        runtime: ConversationRuntime,
        first_id: int,
        events: Sequence[tuple[JsonObject, EventSource]],
        idempotency: IdempotencyRecord | None,
    ) -> asyncio.Future[None]:
        """AgentContext.append_numbered: events a loop numbered itself, appended only if they
        continue the log (one writer at a time: see workers.loop)."""
        if runtime.closing:
            raise LoopClosed(f"conversation {runtime.conversation_id} is closing")
        if first_id != runtime.next_event_id:
            raise EventOutOfSequence(runtime.conversation_id, runtime.next_event_id, first_id)
        return self._append(runtime, events, idempotency, max_bytes=self._config.max_batch_bytes)

    def _publish_status(self, runtime: ConversationRuntime, status: JsonObject) -> None:
        if not runtime.closing:
            self._broadcaster.publish(runtime.conversation_id, [status])

    async def _read_history(
        self, runtime: ConversationRuntime, end_id: int
    ) -> AsyncIterator[list[StoredEvent]]:
        """AgentContext.read_history: what the loop must know before it continues the log."""
        await self._flush()
        async for page in self._read_range(
            runtime.conversation_id, 0, end_id, self._config.max_stream_batch
        ):
            yield page

    def _after_append(self, runtime: ConversationRuntime, durable: asyncio.Future[None]) -> None:
        """A write that conflicted with the stored log leaves this run's ids unusable: the
        run is closed (a new start continues after what is stored); other conversations go on."""
        if durable.cancelled():
            return
        error = durable.exception()
        if isinstance(error, OwnerMoved | LogInterrupted) and not runtime.closing:
            # The lease moved on, or whether the write landed is unknown: nothing more may
            # be written by this run, not even ``stopped``.
            log.warning(
                "conversation.lost",
                conversation_id=runtime.conversation_id,
                error=str(error),
            )
            self._begin_close(runtime, graceful=False)
            if self._membership is not None:
                self._membership.lost(
                    runtime.conversation_id, readopt=isinstance(error, LogInterrupted)
                )
        elif isinstance(error, ConversationLogError) and not runtime.closing:
            log.error(
                "conversation.log_conflict_closed",
                conversation_id=runtime.conversation_id,
                error=str(error),
            )
            self._begin_close(runtime)

    def _on_commit(self, events: Sequence[Event]) -> None:
        """Told of every committed batch in commit order: updates live state and fans out to
        subscribers."""
        by_conversation: defaultdict[str, list[StoredEvent]] = defaultdict(list)
        now = self._clock()
        for event in events:
            by_conversation[event.conversation_id].append(StoredEvent(event.id, event.encoded))
            runtime = self._runtimes.get(event.conversation_id)
            if runtime is None:
                continue
            runtime.last_active = now
            runtime.last_active_time = event.timestamp
            runtime.latest_event_id = event.id
            if event.name == "agent_state_changed" and event.kind is EventKind.OBSERVATION:
                extras = event.payload.get("extras") or {}
                state = str(extras.get("agent_state", runtime.agent_state))
                if state != runtime.agent_state:
                    runtime.agent_state = state
                    if not runtime.closing:
                        self._publish_change(runtime, ChangeKind.AGENT_STATE_CHANGED)
        for cid, stored in by_conversation.items():
            self._broadcaster.publish(cid, stored)

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _user_payload(event: JsonObject) -> JsonObject:
        payload = {k: v for k, v in event.items() if k not in _SERVER_SET_FIELDS}
        args = payload.get("args")
        if (
            payload.get("action") == "message"
            and "message" not in payload
            and isinstance(args, dict)
        ):
            # OpenHands' event_to_dict renders a MessageAction's content as "message" too.
            payload["message"] = args.get("content", "")
        return payload

    def page_size(self, page_size: int) -> int:
        """A request's page size, checked and defaulted."""
        return self._page_size(page_size)

    def _page_size(self, page_size: int) -> int:
        return validation.check_page_size(
            page_size, self._config.default_page_size, self._config.max_page_size
        )

    def _touch(self, runtime: ConversationRuntime) -> None:
        runtime.last_active = self._clock()
        runtime.last_active_time = datetime.now(UTC)

    @staticmethod
    def _not_found(cid: str) -> NotFound:
        return NotFound(
            f"conversation {cid} does not exist",
            reason="CONVERSATION_NOT_FOUND",
            metadata={"conversation_id": cid},
        )

    def _check_owner(self, record: ConversationRecord, user: str | None) -> None:
        # Another user's conversation looks exactly like a missing one.
        if user is not None and record.user_id != user:
            raise self._not_found(record.conversation_id)

    async def _check_visible(self, cid: str, user: str | None) -> None:
        runtime = self._runtimes.get(cid)
        record = runtime.record if runtime is not None else await self._store.get_conversation(cid)
        if record is None:
            raise self._not_found(cid)
        self._check_owner(record, user)

    async def _running(self, cid: str, user: str | None) -> ConversationRuntime:
        runtime = self._runtimes.get(cid)
        if runtime is None or runtime.closing:
            await self._check_visible(cid, user)
            raise FailedPrecondition(
                f"conversation {cid} is not running; start or join it first",
                reason="CONVERSATION_NOT_RUNNING",
                metadata={"conversation_id": cid},
            )
        self._check_owner(runtime.record, user)
        return runtime

    def _view(self, runtime: ConversationRuntime) -> ConversationView:
        record = runtime.record
        return ConversationView(
            conversation_id=record.conversation_id,
            user_id=record.user_id,
            agent=record.agent,
            status=runtime.status,
            agent_state=runtime.agent_state,
            latest_event_id=runtime.latest_event_id,
            create_time=record.create_time,
            last_active_time=runtime.last_active_time,
            connection_count=self._connections.count_for_conversation(record.conversation_id),
        )

    def _watched(self, runtime: ConversationRuntime) -> WatchedConversation:
        cid = runtime.conversation_id
        return WatchedConversation(self._view(runtime), self._connections.ids_for(cid))

    def _publish_change(self, runtime: ConversationRuntime, kind: ChangeKind) -> None:
        self._changes.publish(kind, self._watched(runtime))

    def _connections_changed(self, conversation_id: str) -> None:
        runtime = self._runtimes.get(conversation_id)
        if runtime is not None and not runtime.closing:
            self._publish_change(runtime, ChangeKind.CONNECTIONS_CHANGED)

    def _now_running(self, runtime: ConversationRuntime) -> None:
        """LogAccess.running: the loop finished starting."""
        if not runtime.closing:
            self._publish_change(runtime, ChangeKind.STATUS_CHANGED)

    @property
    def running_count(self) -> int:
        return len(self._runtimes)

    def gauges(self) -> EngineGauges:
        """What the node holds now, for metrics (read at scrape time, in one step)."""
        by_status: defaultdict[str, int] = defaultdict(int)
        by_state: defaultdict[str, int] = defaultdict(int)
        for runtime in self._runtimes.values():
            by_status[runtime.phase.value] += 1
            by_state[runtime.agent_state] += 1
        subscribers, lag = self._broadcaster.backlog()
        return EngineGauges(
            dict(by_status),
            dict(by_state),
            self._connections.count(),
            subscribers,
            lag,
            self._changes.watchers,
            len(self._admission.all_queued()),
        )


__all__ = ["TOO_MANY_CONVERSATIONS", "ConversationEngine", "ConvsvcError", "EngineGauges"]
