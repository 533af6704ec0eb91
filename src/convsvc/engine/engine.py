"""The conversation engine: the commands (start, join, send, disconnect, close), idle
cleanup, and what the cluster asks of a node.

Independent of gRPC: the transport converts requests into calls on :class:`ConversationEngine`
and its domain results back into responses. Every change of a running conversation's phase
goes through ``lifecycle``; reads go through ``queries`` (live state) and ``history``
(stored and streamed events, the audit log).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import structlog

from convsvc import validation
from convsvc.config import EngineConfig
from convsvc.domain import (
    AdmissionPolicy,
    AgentControl,
    ApprovalDecision,
    BusyPolicy,
    Connection,
    ConversationRecord,
    ConversationView,
    EventSource,
    JsonObject,
)
from convsvc.engine.admission import Admission
from convsvc.engine.approvals import decision_answered, decision_event
from convsvc.engine.connections import ConnectionRegistry
from convsvc.engine.history import EventHistory
from convsvc.engine.idempotency import LedgerCall, RequestKey, RequestLedger
from convsvc.engine.lifecycle import TOO_MANY_CONVERSATIONS, Lifecycle
from convsvc.engine.membership import Membership
from convsvc.engine.queries import ConversationQueries
from convsvc.engine.registry import RuntimeRegistry
from convsvc.engine.run_control import (
    BUSY_STATES,
    answered_by,
    change_agent_state,
    has_effect,
)
from convsvc.engine.runtime import AgentFactories, ConversationRuntime, StartRequest
from convsvc.engine.subscriptions import Broadcaster
from convsvc.engine.user_events import first_events, user_payload
from convsvc.engine.visibility import (
    Scope,
    check_owner,
    check_visible,
    not_found,
    out_of_scope,
    running_for,
)
from convsvc.engine.watch import ChangeFeed, ChangeKind
from convsvc.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from convsvc.storage import ConversationStore

log = structlog.get_logger(__name__)

_AGENTS_LISTED = 20
"""Agents an UNKNOWN_AGENT message names (workers may announce many kinds)."""


class ConversationEngine:
    """Starts, joins, feeds and closes conversations; ``queries`` and ``history`` read."""

    def __init__(
        self,
        config: EngineConfig,
        store: ConversationStore,
        agents: AgentFactories,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._store = store
        self._agents = agents  # a live view: worker kinds appear as workers attach
        self._clock = clock
        self._connections = ConnectionRegistry()
        self._registry = RuntimeRegistry(self._connections)
        self._broadcaster = Broadcaster(
            config.subscriber_buffer_events, config.subscriber_buffer_bytes
        )
        self._changes = ChangeFeed(config.watch_history, config.watch_max_lag)
        self._ledger = RequestLedger(store)
        self._admission = Admission(config, store, self._registry, self._changes)
        self._lifecycle = Lifecycle(
            config,
            store,
            agents,
            clock,
            self._registry,
            self._connections,
            self._broadcaster,
            self._changes,
            self._admission,
        )
        self.queries = ConversationQueries(
            config,
            store,
            self._registry,
            self._connections,
            self._admission,
            self._changes,
            self._broadcaster,
            clock,
        )
        self.history = EventHistory(
            config, store, self._registry, self._broadcaster, self._lifecycle.log
        )
        self._cleanup_task: asyncio.Task[None] | None = None

    def join_cluster(self, membership: Membership) -> None:
        """From now on leases decide which conversations run here (see convsvc.cluster)."""
        self._lifecycle.membership = membership
        self._admission.clustered = True
        self._registry.address = membership.address

    async def start(self) -> None:
        """Starts the periodic cleanup (idle loops, silent client instances)."""
        self._cleanup_task = asyncio.create_task(self._cleanup_loop(), name="engine-cleanup")

    def end_streams(self) -> None:
        """Ends every event stream and watch with UNAVAILABLE so clients resume elsewhere
        (shutdown); no new one starts, nor any loop."""
        self._lifecycle.stopping = True
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
        for runtime in self._registry.all():
            self._lifecycle.begin_close(runtime)
        await self._lifecycle.tasks.wait_all()  # closes may still be finishing starts

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
        scope: Scope = None,
        labels: dict[str, str] | None = None,
        title: str = "",
    ) -> ConversationView:
        """Starts a loop, or returns the running one (idempotent). ``scope``: what the
        caller may affect (a scoped token's conversations), evictions included. ``labels``
        and ``title`` describe a conversation the start creates (UpdateConversation changes
        them later)."""
        user = validation.check_user_id(user_id)
        policy = self._admission.policy(admission_policy)
        cid = validation.check_optional_id("conversation_id", conversation_id)
        agent_name = self._check_agent(agent)
        settings = settings or {}
        settings_bytes = validation.check_size("settings", settings, self._config.max_event_bytes)
        first, first_bytes = first_events(initial_user_message, replay_events, self._config)
        start_request = StartRequest(
            first[0] if initial_user_message is not None else None,
            tuple(replay_events),
            settings_bytes + first_bytes,
            validation.check_labels(labels or {}),
            validation.check_title(title),
        )
        key = self._ledger.key(
            user,
            request_id,
            "StartConversation",
            {"conversation_id": cid, "agent": agent_name, "first": first},
        )
        async with self._ledger.call(key) as call:
            if call.recorded is not None:
                cid = str(call.recorded["conversation_id"])
            else:
                runtime, stored = await self._lifecycle.start(
                    cid or uuid.uuid4().hex,
                    user,
                    agent_name,
                    settings,
                    first,
                    call.key,
                    start_request,
                    policy,
                    scope,
                )
                call.answered({"conversation_id": runtime.conversation_id}, stored=stored)
                if not runtime.closing:
                    return self._registry.view(runtime)
                cid = runtime.conversation_id
        return await self.queries.get_conversation(cid, user_id)

    async def fork_conversation(
        self,
        *,
        source_conversation_id: str,
        at_event_id: int | None = None,
        conversation_id: str = "",
        user_id: str = "",
        settings: JsonObject | None = None,
        labels: dict[str, str] | None = None,
        title: str = "",
        request_id: str = "",
        admission_policy: AdmissionPolicy | None = None,
        scope: Scope = None,
    ) -> ConversationView:
        """Starts a new conversation from a copy of the source's log up to ``at_event_id``,
        with the source's stored settings under ``settings`` (secrets are sent again)."""
        source = validation.check_id("source_conversation_id", source_conversation_id)
        user = validation.check_user_id(user_id)
        target = validation.check_optional_id("conversation_id", conversation_id)
        if target == source:
            raise InvalidArgument(
                "a fork needs a conversation_id of its own",
                reason="INVALID_ARGUMENT",
                metadata={"field": "conversation_id"},
            )
        settings = settings or {}
        validation.check_size("settings", settings, self._config.max_event_bytes)
        policy = self._admission.policy(admission_policy)
        key = self._ledger.key(
            user,
            request_id,
            "ForkConversation",
            {"s": source, "a": at_event_id, "c": target, "e": settings},
        )
        async with self._ledger.call(key) as call:
            if call.recorded is not None:
                return await self.queries.get_conversation(
                    str(call.recorded["conversation_id"]), user_id
                )
            stored = await self._store.get_conversation(source)
            if stored is None:
                raise not_found(source)
            check_owner(source, stored.user_id, user)
            target = target or uuid.uuid4().hex
            history = await self.history.copy_for_fork(source, at_event_id, target)
            start_request = StartRequest(
                labels=validation.check_labels(labels or stored.labels),
                title=validation.check_title(title or stored.title),
                history=history,
            )
            runtime, saved = await self._lifecycle.start(
                target,
                stored.user_id,
                stored.agent,
                {**stored.settings, **settings},
                [],
                call.key,
                start_request,
                policy,
                scope,
            )
            call.answered({"conversation_id": target}, stored=saved)
            if not runtime.closing:
                return self._registry.view(runtime)
        return await self.queries.get_conversation(target, user_id)

    async def update_conversation(
        self,
        *,
        conversation_id: str,
        labels: dict[str, str] | None = None,
        title: str | None = None,
        user_id: str = "",
    ) -> ConversationView:
        """Replaces a conversation's labels and/or title (None: kept), running or stopped."""
        cid = validation.check_id("conversation_id", conversation_id)
        if labels is None and title is None:
            raise InvalidArgument(
                "name what to change in update_mask: labels, title or both",
                reason="INVALID_ARGUMENT",
                metadata={"field": "update_mask"},
            )
        labels = validation.check_labels(labels) if labels is not None else None
        title = validation.check_title(title) if title is not None else None
        await self.queries.get_conversation(cid, user_id)  # it exists and is the caller's
        if not await self._store.describe_conversation(cid, labels, title):
            # A start still writing its first record (it is queued or starting).
            raise Unavailable(
                f"conversation {cid} is not stored yet; retry once it started",
                reason="CONVERSATION_STARTING",
                metadata={"conversation_id": cid},
            )
        # The running copy follows the stored one (no await since the write).
        runtime = self._registry.get(cid)
        if runtime is not None:
            if labels is not None:
                runtime.record.labels = labels
            if title is not None:
                runtime.record.title = title
            if not runtime.closing:
                self._lifecycle.publish_change(runtime, ChangeKind.UPDATED)
        return await self.queries.get_conversation(cid, user_id)

    def _check_agent(self, agent: str) -> str | None:
        """The agent a start names (None: the conversation's own, or the default)."""
        if not agent:
            return None
        if agent not in self._agents:
            available = sorted(self._agents)
            shown = ", ".join(available[:_AGENTS_LISTED])
            if len(available) > _AGENTS_LISTED:
                shown += f" and {len(available) - _AGENTS_LISTED} more"
            raise InvalidArgument(
                f"agent {validation.shown(agent)!r} is not installed; available: {shown}",
                reason="UNKNOWN_AGENT",
                metadata={"field": "agent"},
            )
        return agent

    async def join_conversation(
        self,
        *,
        conversation_id: str,
        connection_id: str,
        user_id: str = "",
        settings: JsonObject | None = None,
        client_instance_id: str = "",
        request_id: str = "",
        scope: Scope = None,
    ) -> tuple[ConversationView, Connection]:
        """Registers a connection, starting the loop when it is not running. ``scope``: what
        the caller may affect (evictions, and the conversation a reused connection id
        watched until now)."""
        cid = validation.check_id("conversation_id", conversation_id)
        conn_id = validation.check_id("connection_id", connection_id)
        instance = validation.check_optional_id("client_instance_id", client_instance_id)
        user = validation.check_user_id(user_id)
        settings = settings or {}
        validation.check_size("settings", settings, self._config.max_event_bytes)
        key = self._ledger.key(
            user, request_id, "JoinConversation", {"c": cid, "n": conn_id, "i": instance}
        )
        policy = self._admission.policy(None)
        async with self._ledger.call(key) as call:
            if call.recorded is None:
                await self._check_move(conn_id, cid, user, scope)
                runtime, _ = await self._lifecycle.start(
                    cid, user, None, settings, [], None, None, policy, scope
                )
                await self._connect(runtime, Connection(conn_id, cid, user, instance), scope)
                call.answered({"conversation_id": cid, "connection_id": conn_id}, stored=False)
        view = await self.queries.get_conversation(cid, user_id)
        return view, self._connections.get(conn_id) or Connection(conn_id, cid, user, instance)

    async def _check_move(self, conn_id: str, cid: str, user: str | None, scope: Scope) -> None:
        """A connection id of the user's that watches another conversation moves to
        ``cid``: only if the caller may affect that conversation too (held on any node of a
        cluster). Another user's connection id is refused later (CONNECTION_ID_TAKEN)."""
        if scope is None:
            return
        held = self._connections.get(conn_id)
        membership = self._lifecycle.membership
        if held is None and membership is not None:
            held = await membership.find_connection(conn_id)
        if held is not None and held.user_id == user and held.conversation_id != cid:
            out_of_scope(scope, held.conversation_id, f"connection {conn_id} watches")

    async def _connect(
        self, runtime: ConversationRuntime, connection: Connection, scope: Scope
    ) -> None:
        # No await until the connection is registered: a close marks the runtime closing and
        # drops its connections in one step, so a connection is never left on a closed loop.
        cid, conn_id = connection.conversation_id, connection.connection_id
        if runtime.closing:
            raise Unavailable(
                f"conversation {cid} was closed while joining; join again",
                reason="CONVERSATION_CLOSED",
            )
        held = self._connections.get(conn_id)
        if (
            held is not None
            and connection.user_id is not None
            and held.user_id != connection.user_id
        ):
            raise AlreadyExists(
                f"connection_id {conn_id} is in use by another user; choose a new connection id",
                reason="CONNECTION_ID_TAKEN",
                metadata={"connection_id": conn_id},
            )
        if held is not None and held.conversation_id != cid:  # it watches another one
            out_of_scope(scope, held.conversation_id, f"connection {conn_id} watches")
        self._connections.add(connection, self._clock())
        self._lifecycle.touch(runtime)
        if held is not None and held.conversation_id != cid:
            self._connections_changed(held.conversation_id)
        self._connections_changed(cid)
        if self._lifecycle.membership is not None:
            await self._lifecycle.membership.connection_added(connection)

    async def send_event(
        self,
        *,
        event: JsonObject,
        connection_id: str = "",
        conversation_id: str = "",
        user_id: str = "",
        request_id: str = "",
        busy_policy: BusyPolicy | None = None,
    ) -> tuple[str, int]:
        """Appends a user event and hands it to the loop; returns (conversation id, event id).
        A message for a busy agent waits, is refused or interrupts it (``busy_policy``, else
        the server's)."""
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
        payload = user_payload(validation.check_user_event(event, "event"))
        key = self._ledger.key(user, request_id, "SendEvent", {**target, "e": payload})
        async with self._ledger.call(key) as call:
            if call.recorded is not None:
                result = call.recorded
            else:
                cid = target.get("c") or self._connected_conversation(target["n"], user)
                policy = busy_policy or self._config.busy_policy
                if policy is not BusyPolicy.ENQUEUE and payload.get("action") == "message":
                    await self._mind_busy_agent(cid, user, policy)
                result = await self._append_user_event(cid, user, payload, call)
                call.answered(result, stored=True)
        return str(result["conversation_id"]), int(result["event_id"])

    async def _mind_busy_agent(self, cid: str, user: str | None, policy: BusyPolicy) -> None:
        """Applies a reject or interrupt policy before a message is logged."""
        runtime = await running_for(self._registry, self._store, cid, user)
        state = runtime.agent_state
        if state not in BUSY_STATES:
            return
        if policy is BusyPolicy.REJECT:
            raise FailedPrecondition(
                f"the agent of conversation {cid} is busy ({state}); send again once it "
                "waits for the user, or send with busy_policy INTERRUPT",
                reason="CONVERSATION_BUSY",
                metadata={"conversation_id": cid, "agent_state": state},
            )
        await self._controlled(runtime, cid, user, AgentControl.INTERRUPT, None)

    async def control_agent(
        self,
        *,
        conversation_id: str,
        control: AgentControl,
        user_id: str = "",
        request_id: str = "",
    ) -> tuple[int | None, str]:
        """Pauses, resumes or interrupts the agent (see ``run_control``); returns the id of
        the event written (None when the agent's state made the control pointless) and the
        state the agent reported."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        key = self._ledger.key(user, request_id, "ControlAgent", {"c": cid, "k": control.value})
        runtime = await running_for(self._registry, self._store, cid, user)
        return await self._controlled(runtime, cid, user, control, key)

    async def _controlled(
        self,
        runtime: ConversationRuntime,
        cid: str,
        user: str | None,
        control: AgentControl,
        key: RequestKey | None,
    ) -> tuple[int | None, str]:
        def decide() -> JsonObject | None:
            return change_agent_state(control) if has_effect(control, runtime.agent_state) else None

        return await self._answered_by_agent(
            runtime, cid, user, key, decide, answered_by(control), control.value
        )

    async def confirm_action(
        self,
        *,
        conversation_id: str,
        action_id: int,
        decision: ApprovalDecision,
        user_id: str = "",
        request_id: str = "",
    ) -> tuple[int | None, str]:
        """Approves or rejects the action awaiting confirmation (see ``approvals``); returns
        the id of the event written and the state the agent reported. Only the pending
        action can be decided, once."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        if action_id < 0:
            raise InvalidArgument(
                "action_id must be the event id of the pending action (0 or more)",
                reason="INVALID_ARGUMENT",
                metadata={"field": "action_id"},
            )
        key = self._ledger.key(
            user, request_id, "ConfirmAction", {"c": cid, "a": action_id, "d": decision.value}
        )
        runtime = await running_for(self._registry, self._store, cid, user)

        def decide() -> JsonObject:
            pending = runtime.pending_action
            if pending is None or pending.event_id != action_id:
                raise FailedPrecondition(
                    f"action {action_id} of conversation {cid} does not await confirmation"
                    + (
                        f"; the pending action is {pending.event_id}"
                        if pending is not None
                        else "; no action does"
                    ),
                    reason="ACTION_NOT_PENDING",
                    metadata={
                        "conversation_id": cid,
                        "agent_state": runtime.agent_state,
                        "pending_action_id": str(pending.event_id) if pending else "",
                    },
                )
            if runtime.deciding_action_id == action_id:
                raise FailedPrecondition(
                    f"action {action_id} of conversation {cid} is being decided by another call",
                    reason="ACTION_NOT_PENDING",
                    metadata={"conversation_id": cid, "agent_state": runtime.agent_state},
                )
            runtime.deciding_action_id = action_id  # no await since the check above
            return decision_event(decision)

        def undecided() -> None:
            if runtime.deciding_action_id == action_id:
                runtime.deciding_action_id = -1

        return await self._answered_by_agent(
            runtime, cid, user, key, decide, decision_answered, decision.value, undecided
        )

    async def _answered_by_agent(
        self,
        runtime: ConversationRuntime,
        cid: str,
        user: str | None,
        key: RequestKey | None,
        decide: Callable[[], JsonObject | None],
        answers: Callable[[str], bool],
        what: str,
        not_written: Callable[[], None] | None = None,
    ) -> tuple[int | None, str]:
        """Writes the user event ``decide`` returns (once per request id; nothing when it
        returns None) and waits for the agent's answer, at most the control timeout."""
        reported = runtime.agent_state_reported(answers)  # before the write: none is missed
        try:
            async with asyncio.timeout(self._config.control_timeout_seconds):
                async with self._ledger.call(key) as call:
                    if call.recorded is not None:
                        event_id = call.recorded["event_id"]
                    elif (payload := decide()) is None:
                        call.answered({"conversation_id": cid, "event_id": None}, stored=False)
                        return None, runtime.agent_state
                    else:
                        try:
                            result = await self._append_user_event(cid, user, payload, call)
                        except BaseException:
                            if not_written is not None:
                                not_written()
                            raise
                        call.answered(result, stored=True)
                        event_id = result["event_id"]
                if event_id is not None and reported.done():
                    return event_id, reported.result()  # the first answer, not what followed
                if (
                    event_id is None
                    or answers(runtime.agent_state)
                    # A retry after the agent answered (whatever has happened since).
                    or runtime.agent_state_event_id > event_id
                ):
                    return event_id, runtime.agent_state
                return event_id, await reported
        except TimeoutError:
            self._report_unresponsive(runtime, what)
            raise DeadlineExceeded(
                f"the agent of conversation {cid} did not answer {what} within "
                f"{self._config.control_timeout_seconds:g} s",
                reason="AGENT_UNRESPONSIVE",
                metadata={"conversation_id": cid, "agent_state": runtime.agent_state},
            ) from None
        finally:
            reported.cancel()

    @staticmethod
    def _report_unresponsive(runtime: ConversationRuntime, what: str) -> None:
        """Tells the conversation's clients and the operator, instead of hanging."""
        log.warning(
            "agent.unresponsive",
            conversation_id=runtime.conversation_id,
            control=what,
            agent_state=runtime.agent_state,
        )
        runtime.publish_status(
            {
                "status_update": True,
                "type": "error",
                "id": "AGENT_ERROR$AGENT_UNRESPONSIVE",
                "message": f"The agent did not answer {what}.",
            }
        )

    async def _append_user_event(
        self, cid: str, user: str | None, payload: JsonObject, call: LedgerCall
    ) -> JsonObject:
        """Logs a user event (its idempotency record in the same commit) once durable."""
        key = call.key
        runtime = await running_for(self._registry, self._store, cid, user)
        if runtime.agent.numbers_own_events:
            # Checked here, where it enters: the loop logs it later (and elsewhere).
            size = validation.check_event_size("event", payload, self._config.max_event_bytes)
            event_id = await runtime.agent.submit_user_event(
                payload,
                lambda event_id: (
                    key.record({"conversation_id": cid, "event_id": event_id}) if key else None
                ),
                (key.scope, key.request_id) if key else None,
                payload_bytes=size,
            )
            return {"conversation_id": cid, "event_id": event_id}
        # No await between finding the runtime running and queueing the event.
        result: JsonObject = {"conversation_id": cid, "event_id": runtime.next_event_id}
        await call.committing(
            self._lifecycle.log.append(
                runtime,
                [(payload, EventSource.USER)],
                key.record(result) if key else None,
                max_bytes=self._config.max_event_bytes,
            )
        )
        return result

    def _connected_conversation(self, conn_id: str, user: str | None) -> str:
        connection = self._connections.get(conn_id)
        if connection is None or (user is not None and connection.user_id != user):
            raise NotFound(
                f"connection {conn_id} is not joined to any conversation; join first",
                reason="CONNECTION_NOT_FOUND",
                metadata={"connection_id": conn_id},
            )
        return connection.conversation_id

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
        config_bytes = validation.check_size(
            "llm_config", llm_config or {}, self._config.max_event_bytes
        )
        # With the config they must fit in one message (the worker receives them together).
        validation.check_size(
            "messages", {"messages": list(messages)}, self._config.max_batch_bytes - config_bytes
        )
        runtime = await running_for(self._registry, self._store, cid, user)
        return await runtime.agent.complete(service_id, llm_config or {}, list(messages))

    async def disconnect(
        self, *, connection_id: str, user_id: str = "", request_id: str = ""
    ) -> bool:
        """Removes a connection; False when it was already gone (idempotent)."""
        conn_id = validation.check_id("connection_id", connection_id)
        user = validation.check_user_id(user_id)
        key = self._ledger.key(user, request_id, "DisconnectConnection", {"n": conn_id})
        async with self._ledger.call(key) as call:
            if call.recorded is not None:
                return bool(call.recorded["removed"])
            removed = await self._disconnect(conn_id, user)
            call.answered({"removed": removed}, stored=False)
        return removed

    async def _disconnect(self, conn_id: str, user: str | None) -> bool:
        connection = self._connections.get(conn_id)
        if connection is None or (user is not None and connection.user_id != user):
            return False
        self._connections.remove(conn_id)
        runtime = self._registry.get(connection.conversation_id)
        if runtime is not None:
            self._lifecycle.touch(runtime)  # idle cleanup counts from the last viewer leaving
        self._connections_changed(connection.conversation_id)
        if self._lifecycle.membership is not None:
            await self._lifecycle.membership.connections_removed([conn_id])
        log.info(
            "connection.removed", conversation_id=connection.conversation_id, connection_id=conn_id
        )
        return True

    async def close_conversation(
        self, *, conversation_id: str, user_id: str = "", request_id: str = ""
    ) -> ConversationView:
        """Stops a loop and drops its connections (idempotent)."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        key = self._ledger.key(user, request_id, "CloseConversation", {"c": cid})
        async with self._ledger.call(key) as call:
            if call.recorded is None:
                runtime = self._registry.get(cid)
                if runtime is None:
                    await check_visible(self._registry, self._store, cid, user)
                else:
                    check_owner(cid, runtime.record.user_id, user)
                    await asyncio.shield(self._lifecycle.begin_close(runtime))
                call.answered({"conversation_id": cid}, stored=False)
        return await self.queries.get_conversation(cid, user_id)

    async def evict(self, conversation_id: str) -> bool:
        """Closes a loop running here to make room under the per-user limit (a claim on
        another node asked); False when it does not run here."""
        return await self._lifecycle.evict_here(conversation_id)

    async def take_over(self, record: ConversationRecord) -> bool:
        """Starts, from its log, a conversation whose owner is gone (or handed it over);
        False when it was running here already."""
        return await self._lifecycle.take_over(record)

    async def hand_off_all(self) -> None:
        """Drain: every loop here is handed to another node (no ``stopped``)."""
        await self._lifecycle.hand_off_all()

    def adopt_connections(self, connections: Sequence[Connection]) -> None:
        """Registers connections made through a node that no longer runs their
        conversation (their heartbeats count from now)."""
        now = self._clock()
        for connection in connections:
            if self._registry.running(connection.conversation_id) is not None:
                self._connections.add(connection, now)
                self._connections_changed(connection.conversation_id)

    async def run_cleanup_once(self) -> None:
        """Expires silent client instances' connections and closes idle loops."""
        now = self._clock()
        ttl = self._config.connection_ttl_seconds
        if self._lifecycle.membership is not None:
            # A client instance may heartbeat any node of the cluster.
            silent = self._connections.silent_instances(now, ttl)
            for instance in await self._lifecycle.membership.instances_alive(silent, ttl):
                self._connections.heartbeat(instance, now)
        expired = self._connections.expire_instances(now, ttl)
        for cid in sorted({c.conversation_id for c in expired}):
            self._connections_changed(cid)
        if self._lifecycle.membership is not None and expired:
            await self._lifecycle.membership.connections_removed([c.connection_id for c in expired])
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
            self._lifecycle.begin_close(rt)
            for rt in self._registry.all()
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
            except Exception:  # the next round tries again; the loop must outlive a failure
                log.exception("cleanup.failed")

    def _connections_changed(self, conversation_id: str) -> None:
        runtime = self._registry.running(conversation_id)
        if runtime is not None:
            self._lifecycle.publish_change(runtime, ChangeKind.CONNECTIONS_CHANGED)


__all__ = ["TOO_MANY_CONVERSATIONS", "ConversationEngine"]
