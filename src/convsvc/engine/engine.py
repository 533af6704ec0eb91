"""The conversation engine: the registry of running loops and the rules OpenHands keeps.

Independent of gRPC: the transport converts requests into calls on :class:`ConversationEngine`
and its domain results back into responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from convsvc.agents import AgentLoop, agent_state_changed
from convsvc.codec import encode_event
from convsvc.config import EngineConfig
from convsvc.domain import (
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
from convsvc.engine.connections import ConnectionRegistry
from convsvc.engine.paging import decode_token, encode_token
from convsvc.engine.runtime import ConversationRuntime
from convsvc.engine.secrets import redact
from convsvc.engine.subscriptions import Broadcaster, StreamItem, SubscriberTooSlow
from convsvc.errors import (
    AlreadyExists,
    ConvsvcError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from convsvc.storage import ConversationStore

log = structlog.get_logger(__name__)

TOO_MANY_CONVERSATIONS = "AGENT_ERROR$TOO_MANY_CONVERSATIONS"
_SERVER_SET_FIELDS = ("id", "timestamp", "source")
_MAX_UNCOMMITTED_EMITS = 1000
"""Events a loop may have waiting for commit before its next emit waits for the disk."""


def _retrieve_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(slots=True, frozen=True)
class _RequestKey:
    scope: str
    request_id: str
    method: str
    fingerprint: str

    def record(self, result: JsonObject) -> IdempotencyRecord:
        return IdempotencyRecord(self.scope, self.request_id, self.method, self.fingerprint, result)


class ConversationEngine:
    """Starts, joins, feeds, lists and closes conversations; streams their events."""

    def __init__(
        self,
        config: EngineConfig,
        store: ConversationStore,
        agents: Mapping[str, type[AgentLoop]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._store = store
        self._agents = dict(agents)
        self._clock = clock
        self._runtimes: dict[str, ConversationRuntime] = {}
        self._connections = ConnectionRegistry()
        self._broadcaster = Broadcaster(config.subscriber_buffer_events)
        self._inflight: dict[tuple[str, str], asyncio.Future[JsonObject]] = {}
        self._cleanup_task: asyncio.Task[None] | None = None
        self._stopping = False
        store.set_commit_listener(self._on_commit)

    # -- lifecycle of the engine ---------------------------------------------------------

    async def start(self) -> None:
        """Starts the periodic cleanup (idle loops, silent client instances)."""
        self._cleanup_task = asyncio.create_task(self._cleanup_loop(), name="engine-cleanup")

    def end_streams(self) -> None:
        """Ends every event stream with UNAVAILABLE so clients resume elsewhere (shutdown)."""
        self._stopping = True
        self._broadcaster.fail_all(
            Unavailable(
                "the server is shutting down; resume the stream on another server or later",
                reason="SHUTTING_DOWN",
            )
        )

    async def stop(self) -> None:
        """Ends streams, stops cleanup and closes every loop; the store's owner flushes it."""
        self.end_streams()
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup_task
            self._cleanup_task = None
        await asyncio.gather(
            *(self._close_runtime(rt) for rt in list(self._runtimes.values())),
            return_exceptions=True,
        )

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
    ) -> ConversationView:
        """Starts a loop, or returns the running one (idempotent)."""
        user = validation.check_user_id(user_id)
        cid = validation.check_optional_id("conversation_id", conversation_id)
        agent_name = agent or self._config.default_agent
        if agent_name not in self._agents:
            raise InvalidArgument(
                f"agent {agent_name!r} is not installed; "
                f"available: {', '.join(sorted(self._agents))}",
                reason="UNKNOWN_AGENT",
                metadata={"field": "agent"},
            )
        settings = settings or {}
        validation.check_size("settings", settings, self._config.max_event_bytes)
        first_events: list[JsonObject] = []
        if initial_user_message is not None:
            first_events.append(
                self._user_payload(
                    validation.check_user_event(initial_user_message, self._config.max_event_bytes)
                )
            )
        for replayed in replay_events:
            # A trajectory replays only what its user did; the agent produces the rest anew.
            if replayed.get("source") == "user" and isinstance(replayed.get("action"), str):
                first_events.append(self._user_payload(replayed))
        key = self._request_key(
            user,
            request_id,
            "StartConversation",
            {"conversation_id": cid, "agent": agent_name, "first": first_events},
        )
        recalled = await self._recall(key)
        if recalled is not None:
            return await self.get_conversation(recalled["conversation_id"], user_id)
        try:
            view = await self._start(
                cid or uuid.uuid4().hex, user, agent_name, settings, first_events, key
            )
        except BaseException as exc:
            self._forget(key, exc)
            raise
        await self._remember(key, {"conversation_id": view.conversation_id}, persisted=True)
        return view

    async def _start(
        self,
        cid: str,
        user: str | None,
        agent_name: str,
        settings: JsonObject,
        first_events: list[JsonObject],
        key: _RequestKey | None,
    ) -> ConversationView:
        while True:
            runtime = self._runtimes.get(cid)
            if runtime is not None:
                self._check_owner(runtime.record, user)
                if not runtime.closing:
                    return self._view(runtime)
                await runtime.closed.wait()
                continue
            record = await self._store.get_conversation(cid)
            if record is not None:
                self._check_owner(record, user)
                owner = record.user_id
            else:
                owner = user
            latest = await self._store.latest_event_id(cid) if record is not None else -1
            if cid in self._runtimes:
                continue  # started meanwhile by another call: answer with that one
            await self._enforce_user_limit(owner)
            if cid not in self._runtimes:
                break
        now_wall = datetime.now(UTC)
        record = ConversationRecord(
            conversation_id=cid,
            user_id=owner,
            agent=agent_name,
            settings=redact(settings),
            create_time=record.create_time if record is not None else now_wall,
            last_active_time=now_wall,
        )
        agent_cls = self._agents[agent_name]
        runtime = ConversationRuntime(
            record,
            settings,
            agent_cls,
            self._emit,
            self._flush,
            next_event_id=latest + 1,
            now=self._clock(),
        )
        self._runtimes[cid] = runtime  # registered before any await: concurrent starts see it
        try:
            await self._store.save_conversation(
                record, key.record({"conversation_id": cid}) if key else None
            )
            await self._append(
                runtime,
                [(agent_state_changed("loading"), EventSource.ENVIRONMENT)]
                + [(payload, EventSource.USER) for payload in first_events],
            )
        except BaseException:
            del self._runtimes[cid]
            runtime.closed.set()
            raise
        runtime.launch()
        log.info("conversation.started", conversation_id=cid, user_id=owner, agent=agent_name)
        return self._view(runtime)

    async def _enforce_user_limit(self, user: str | None) -> None:
        """Closes the user's least recently active loops so that one more fits."""
        limit = self._config.max_concurrent_conversations
        while True:
            mine = [
                rt for rt in self._runtimes.values() if rt.record.user_id == user and not rt.closing
            ]
            excess = len(mine) - limit + 1
            if excess <= 0:
                return
            mine.sort(key=lambda rt: rt.last_active)
            for runtime in mine[:excess]:
                log.info(
                    "conversation.evicted",
                    conversation_id=runtime.conversation_id,
                    user_id=user,
                    limit=limit,
                )
                self._broadcaster.publish(
                    runtime.conversation_id,
                    [
                        {
                            "status_update": True,
                            "type": "error",
                            "id": TOO_MANY_CONVERSATIONS,
                            "message": (
                                f"Too many conversations are running (the limit is {limit}); "
                                "this one was stopped to make room for a new one."
                            ),
                            "conversation_id": runtime.conversation_id,
                        }
                    ],
                )
            await asyncio.gather(*(self._close_runtime(rt) for rt in mine[:excess]))

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
        key = self._request_key(
            user, request_id, "JoinConversation", {"c": cid, "n": conn_id, "i": instance}
        )
        recalled = await self._recall(key)
        if recalled is None:
            try:
                await self.start_conversation(
                    conversation_id=cid, user_id=user_id, settings=settings
                )
                runtime = self._runtimes.get(cid)
                if runtime is None or runtime.closing:
                    raise Unavailable(
                        f"conversation {cid} was closed while joining; join again",
                        reason="CONVERSATION_CLOSED",
                    )
                connection = Connection(conn_id, cid, user, instance)
                self._connections.add(connection, self._clock())
                self._touch(runtime)
            except BaseException as exc:
                self._forget(key, exc)
                raise
            await self._remember(key, {"conversation_id": cid, "connection_id": conn_id})
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
            conn_id = validation.check_id("connection_id", connection_id)
            connection = self._connections.get(conn_id)
            if connection is None or (user is not None and connection.user_id != user):
                raise NotFound(
                    f"connection {conn_id} is not joined to any conversation; join first",
                    reason="CONNECTION_NOT_FOUND",
                    metadata={"connection_id": conn_id},
                )
            cid = connection.conversation_id
        else:
            cid = validation.check_id("conversation_id", conversation_id)
        payload = self._user_payload(
            validation.check_user_event(event, self._config.max_event_bytes)
        )
        key = self._request_key(user, request_id, "SendEvent", {"c": cid, "e": payload})
        recalled = await self._recall(key)
        if recalled is not None:
            return recalled["conversation_id"], int(recalled["event_id"])
        try:
            runtime = await self._running(cid, user)
            event_id = runtime.next_event_id
            result = {"conversation_id": cid, "event_id": event_id}
            await self._append(
                runtime, [(payload, EventSource.USER)], key.record(result) if key else None
            )
        except BaseException as exc:
            self._forget(key, exc)
            raise
        await self._remember(key, result, persisted=True)
        return cid, event_id

    async def disconnect(
        self, *, connection_id: str, user_id: str = "", request_id: str = ""
    ) -> bool:
        """Removes a connection; False when it was already gone (idempotent)."""
        conn_id = validation.check_id("connection_id", connection_id)
        user = validation.check_user_id(user_id)
        key = self._request_key(user, request_id, "DisconnectConnection", {"n": conn_id})
        recalled = await self._recall(key)
        if recalled is not None:
            return bool(recalled["removed"])
        connection = self._connections.get(conn_id)
        removed = False
        if connection is not None and (user is None or connection.user_id == user):
            self._connections.remove(conn_id)
            removed = True
            runtime = self._runtimes.get(connection.conversation_id)
            if runtime is not None:
                self._touch(runtime)  # idle cleanup counts from the last viewer leaving
            log.info(
                "connection.removed",
                conversation_id=connection.conversation_id,
                connection_id=conn_id,
            )
        await self._remember(key, {"removed": removed})
        return removed

    async def close_conversation(
        self, *, conversation_id: str, user_id: str = "", request_id: str = ""
    ) -> ConversationView:
        """Stops a loop and drops its connections (idempotent)."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        key = self._request_key(user, request_id, "CloseConversation", {"c": cid})
        recalled = await self._recall(key)
        if recalled is None:
            try:
                runtime = self._runtimes.get(cid)
                if runtime is not None:
                    self._check_owner(runtime.record, user)
                    await self._close_runtime(runtime)
            except BaseException as exc:
                self._forget(key, exc)
                raise
            await self._remember(key, {"conversation_id": cid})
        return await self.get_conversation(cid, user_id)

    async def _close_runtime(self, runtime: ConversationRuntime) -> None:
        if runtime.closing:
            await runtime.closed.wait()
            return
        runtime.closing = True
        cid = runtime.conversation_id
        try:
            self._connections.remove_conversation(cid)
            await runtime.shutdown()
            await self._append(runtime, [(agent_state_changed("stopped"), EventSource.ENVIRONMENT)])
            runtime.record.last_active_time = datetime.now(UTC)
            await self._store.save_conversation(runtime.record)
        finally:
            self._runtimes.pop(cid, None)
            runtime.status = ConversationStatus.STOPPED
            runtime.closed.set()
        log.info("conversation.closed", conversation_id=cid)

    # -- reads -----------------------------------------------------------------------------

    async def get_conversation(self, conversation_id: str, user_id: str = "") -> ConversationView:
        """Returns a conversation, running or stopped."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        runtime = self._runtimes.get(cid)
        if runtime is not None:
            self._check_owner(runtime.record, user)
            return self._view(runtime)
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
            for cid, runtime in self._runtimes.items():
                if (
                    not runtime.closing
                    and (user is None or runtime.record.user_id == user)
                    and (not wanted or cid in wanted)
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

        return self._page(
            "connections", user_id, conversation_ids, page_size, page_token, candidates
        )

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
        after = decode_token(page_token, query) if page_token else ""
        matching = sorted(
            (item for item in candidates(user, wanted) if item[0] > after), key=lambda i: i[0]
        )
        page = matching[:size]
        token = encode_token(query, page[-1][0]) if len(matching) > size else ""
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
        low, high = start_id, end_id
        if page_token:
            position = int(decode_token(page_token, query))
            if reverse:
                high = position
            else:
                low = position
        rows = await self._store.read_events(cid, low, high, reverse=reverse, limit=size + 1)
        token = encode_token(query, rows[size].id) if len(rows) > size else ""
        return rows[:size], token

    async def stream_events(
        self, *, conversation_id: str, user_id: str = "", start_id: int = 0, max_batch: int = 0
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
        subscription = self._broadcaster.subscribe(cid)
        next_id = start_id
        try:
            while True:
                rows = await self._store.read_events(cid, next_id, limit=batch)
                if rows:
                    next_id = rows[-1].id + 1
                    yield list(rows)
                if len(rows) < batch:
                    break
            while True:
                items = await subscription.next_items(batch)
                out: list[StreamItem] = []
                for item in items:
                    if not isinstance(item, StoredEvent):
                        out.append(item)
                        continue
                    if item.id < next_id:
                        continue
                    if item.id > next_id:  # defensive: fill from the log rather than skip
                        out.extend(
                            await self._store.read_events(
                                cid, next_id, item.id - 1, limit=item.id - next_id
                            )
                        )
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

    def heartbeat(self, client_instance_id: str) -> tuple[int, float]:
        """Keeps an instance's connections alive; returns (connections, ttl seconds)."""
        instance = validation.check_id("client_instance_id", client_instance_id)
        count = self._connections.heartbeat(instance, self._clock())
        return count, self._config.connection_ttl_seconds

    # -- cleanup -----------------------------------------------------------------------------

    async def run_cleanup_once(self) -> None:
        """Expires silent client instances' connections and closes idle loops."""
        now = self._clock()
        for connection in self._connections.expire_instances(
            now, self._config.connection_ttl_seconds
        ):
            log.info(
                "connection.expired",
                conversation_id=connection.conversation_id,
                connection_id=connection.connection_id,
                client_instance_id=connection.client_instance_id,
            )
        idle = [
            rt
            for rt in self._runtimes.values()
            if not rt.closing
            and rt.agent_state != "running"
            and self._connections.count_for_conversation(rt.conversation_id) == 0
            and now - rt.last_active > self._config.close_delay_seconds
        ]
        for runtime in idle:
            log.info("conversation.idle", conversation_id=runtime.conversation_id)
        await asyncio.gather(*(self._close_runtime(rt) for rt in idle), return_exceptions=True)
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
        event_id = runtime.next_event_id
        durable = self._append(runtime, [(payload, source)])
        # Nobody awaits this future: a failed store reaches the loop at its next emit or flush.
        durable.add_done_callback(_retrieve_outcome)
        return event_id

    async def _flush(self) -> None:
        """AgentContext.flush: returns once every event appended so far is durable."""
        await self._store.submit_events(())

    def _append(
        self,
        runtime: ConversationRuntime,
        payloads: Sequence[tuple[JsonObject, EventSource]],
        idempotency: IdempotencyRecord | None = None,
    ) -> asyncio.Future[None]:
        """Gives events the next ids, encodes them and queues them for commit; hands user
        actions to the loop at once. Returns the future of their durability.

        Nothing here awaits, so ids are taken and queued in one step: however many appends run
        concurrently, the log has neither gaps nor reordering. Callers are answered and
        subscribers see events only once they are durable, and because commits keep their
        order, what a loop appends in answer to an event can never be durable without it. The
        loop does not wait for each commit, so its answer can share the commit of the event.
        """
        timestamp = datetime.now(UTC)
        stamp = timestamp.isoformat()
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
                runtime.conversation_id, event_id, timestamp, source.value, kind, name, full
            )
            event.encoded = encode_event(event)
            events.append(event)
        durable = self._store.submit_events(events, idempotency)
        runtime.next_event_id = first_id + len(events)  # only once queued: a failure skips no id
        for event in events:
            if event.source == EventSource.USER and event.kind is EventKind.ACTION:
                runtime.deliver(event.payload)
        return durable

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
                runtime.agent_state = str(extras.get("agent_state", runtime.agent_state))
        for cid, stored in by_conversation.items():
            self._broadcaster.publish(cid, stored)

    # -- idempotency (AIP-155) ---------------------------------------------------------------

    def _request_key(
        self, user: str | None, request_id: str, method: str, args: Any
    ) -> _RequestKey | None:
        if not request_id:
            return None
        validation.check_id("request_id", request_id)
        digest = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode())
        return _RequestKey(user or "", request_id, method, digest.hexdigest()[:32])

    async def _recall(self, key: _RequestKey | None) -> JsonObject | None:
        """The first answer for a repeated request id, or None (the caller then runs it)."""
        if key is None:
            return None
        slot = (key.scope, key.request_id)
        pending = self._inflight.get(slot)
        if pending is not None:
            result = await asyncio.shield(pending)  # the first call's error propagates
            self._check_same_request(key, result)
            return result
        self._inflight[slot] = asyncio.get_running_loop().create_future()
        try:
            record = await self._store.get_idempotency(key.scope, key.request_id)
        except BaseException as exc:
            self._forget(key, exc)
            raise
        if record is None:
            return None
        self._check_same_request(key, record.result, record)
        future = self._inflight.pop(slot)
        future.set_result(record.result | {"_method": record.method, "_fp": record.fingerprint})
        return record.result

    @staticmethod
    def _check_same_request(
        key: _RequestKey, result: JsonObject, record: IdempotencyRecord | None = None
    ) -> None:
        method = record.method if record else result.get("_method")
        fingerprint = record.fingerprint if record else result.get("_fp")
        if (method, fingerprint) != (key.method, key.fingerprint):
            raise AlreadyExists(
                f"request_id {key.request_id!r} was already used for a different request; "
                "use a new request_id for a new request",
                reason="REQUEST_ID_CONFLICT",
                metadata={"request_id": key.request_id},
            )

    async def _remember(
        self, key: _RequestKey | None, result: JsonObject, *, persisted: bool = False
    ) -> None:
        if key is None:
            return
        if not persisted:
            await self._store.save_idempotency(key.record(result))
        future = self._inflight.pop((key.scope, key.request_id), None)
        if future is not None and not future.done():
            future.set_result(result | {"_method": key.method, "_fp": key.fingerprint})

    def _forget(self, key: _RequestKey | None, error: BaseException) -> None:
        if key is None:
            return
        future = self._inflight.pop((key.scope, key.request_id), None)
        if future is not None and not future.done():
            future.set_exception(error)
            future.exception()  # marks it retrieved when no duplicate is waiting

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

    @property
    def running_count(self) -> int:
        return len(self._runtimes)


__all__ = ["TOO_MANY_CONVERSATIONS", "ConversationEngine", "ConvsvcError"]
