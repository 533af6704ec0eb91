"""RemoteConversationManager: OpenHands' ConversationManager, with the agent loops in convsvc.

OpenHands builds it with ``get_instance`` at import time and opens it with ``async with`` in
its app's lifespan; the channels, the heartbeat and the relays live between the two.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import socketio
from openhands.core.config import OpenHandsConfig
from openhands.events.action import MessageAction
from openhands.events.serialization import event_to_dict
from openhands.server.config.server_config import ServerConfig
from openhands.server.conversation_manager.conversation_manager import ConversationManager
from openhands.server.data_models.agent_loop_info import AgentLoopInfo
from openhands.server.monitoring import MonitoringListener
from openhands.storage.data_models.conversation_status import (
    ConversationStatus as OpenHandsStatus,
)
from openhands.storage.data_models.settings import Settings
from openhands.storage.files import FileStore
from pydantic import SecretStr

from convclient.client import AsyncConvsvcClient
from convclient.config import ClientSettings
from convclient.errors import ConvsvcClientError, NotFoundError, ServiceUnavailableError
from convclient.mirror import ConversationMirror
from convclient.models import AgentControl, ApprovalDecision, Conversation, ConversationStatus
from convclient.openhands.compat import replays_through_join
from convclient.openhands.conversation import RemoteConversation
from convclient.openhands.event_store import RemoteEventStore
from convclient.openhands.metadata import MetadataFollower
from convclient.openhands.relay import ConnectionRelay
from convclient.openhands.remote_session import RemoteAgentSession
from convclient.requests import new_request_id
from convclient.sync_client import ConvsvcClient

log = logging.getLogger(__name__)

ROOM_KEY = "room:{sid}"  # OpenHands' socket.io room of a conversation
_STATUS = {
    ConversationStatus.STARTING: OpenHandsStatus.STARTING,
    ConversationStatus.RUNNING: OpenHandsStatus.RUNNING,
    ConversationStatus.STOPPED: OpenHandsStatus.STOPPED,
    # OpenHands has no queue: a start that waits for room is still starting to its eyes.
    ConversationStatus.QUEUED: OpenHandsStatus.STARTING,
}
# Secret containers pydantic cannot dump as JSON; sent in their own shape (see below).
_SECRET_CONTAINERS = {"secrets_store", "git_provider_tokens", "custom_secrets"}


def settings_to_json(settings: Settings) -> dict[str, Any]:
    """The user's settings as JSON, secrets included: the agent worker needs the LLM key, git
    tokens and custom secrets; convsvc keeps them in memory only (never stored or logged).

    ``git_provider_tokens`` becomes {provider: {"token", "user_id", "host"}} and
    ``custom_secrets`` {name: {"secret", "description"}} (ConversationInitData's fields).
    """
    fields = set(type(settings).model_fields) - _SECRET_CONTAINERS
    dumped: dict[str, Any] = settings.model_dump(
        mode="json", include=fields, context={"expose_secrets": True}
    )
    tokens = getattr(settings, "git_provider_tokens", None) or {}
    if tokens:
        dumped["git_provider_tokens"] = {
            getattr(provider, "value", str(provider)): {
                "token": token.token.get_secret_value() if token.token else "",
                "user_id": token.user_id,
                "host": token.host,
            }
            for provider, token in tokens.items()
        }
    secrets = getattr(settings, "custom_secrets", None) or {}
    if secrets:
        dumped["custom_secrets"] = {
            name: {"secret": secret.secret.get_secret_value(), "description": secret.description}
            for name, secret in secrets.items()
        }
    return dumped


def llm_config_to_json(llm_config: Any) -> dict[str, Any]:
    """An OpenHands LLMConfig as JSON with its secrets (the worker needs the key; convsvc
    keeps it in memory for the call only)."""
    dumped: dict[str, Any] = llm_config.model_dump(mode="json")
    for name in type(llm_config).model_fields:
        value = getattr(llm_config, name)
        if isinstance(value, SecretStr):
            dumped[name] = value.get_secret_value()
    return dumped


def _user(user_id: str | None) -> str:
    return user_id or ""  # OpenHands without auth has no user: a trusted, service-wide call


def _requested_start_id(environ: dict[str, Any] | None) -> int:
    """One past the ``latest_event_id`` the browser connected with (-1: it has none)."""
    query = parse_qs((environ or {}).get("QUERY_STRING", ""))
    try:
        return max(int(query.get("latest_event_id", ["-1"])[0]) + 1, 0)
    except ValueError:
        return 0


@dataclass(frozen=True)
class _Join:
    sid: str
    user_id: str
    settings: dict[str, Any]


_CONTROLS = {
    "paused": AgentControl.PAUSE,
    "running": AgentControl.RESUME,
    "stopped": AgentControl.INTERRUPT,
}
"""OpenHands' browser pauses, resumes and stops the agent with change_agent_state."""


_DECISIONS = {
    "user_confirmed": ApprovalDecision.APPROVE,
    "user_rejected": ApprovalDecision.REJECT,
}
"""... and approves or rejects a pending action (confirmation mode) with it too."""


def _state_asked(data: dict[str, Any]) -> str | None:
    if data.get("action") != "change_agent_state":
        return None
    args = data.get("args")
    return str(args.get("agent_state", "")) if isinstance(args, dict) else None


class RemoteConversationManager(ConversationManager):
    """Runs OpenHands conversations in convsvc; configured by ``CONVSVC_*`` (see convclient)."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        config: OpenHandsConfig,
        file_store: FileStore,
        server_config: ServerConfig,
        monitoring_listener: MonitoringListener | None = None,
        client_settings: ClientSettings | None = None,
    ) -> None:
        self.sio = sio
        self.config = config
        self.file_store = file_store
        self.server_config = server_config
        self.monitoring_listener = monitoring_listener
        self.client_settings = client_settings or ClientSettings()
        # One instance id per web process: its connections expire together if it dies.
        self.client_instance_id = f"openhands-{uuid.uuid4().hex}"
        self._client: AsyncConvsvcClient | None = None
        self._sync_client: ConvsvcClient | None = None
        self._relays: dict[str, ConnectionRelay] = {}
        # What each local connection joined with, to join again after a service restart.
        self._joins: dict[str, _Join] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._followers: dict[str, MetadataFollower] = {}
        self._mirror: ConversationMirror | None = None

    @classmethod
    def get_instance(
        cls,
        sio: socketio.AsyncServer,
        config: OpenHandsConfig,
        file_store: FileStore,
        server_config: ServerConfig,
        monitoring_listener: MonitoringListener,
    ) -> RemoteConversationManager:
        return cls(sio, config, file_store, server_config, monitoring_listener)

    async def __aenter__(self) -> RemoteConversationManager:
        self._client = AsyncConvsvcClient(self.client_settings)
        self._sync_client = ConvsvcClient(self.client_settings)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="convsvc-heartbeat")
        # What OpenHands asks again and again (which loops run, which connections exist) is
        # answered from a copy the service keeps current, instead of a call per question.
        self._mirror = ConversationMirror(self._client)
        self._mirror.start()
        log.info("conversations run in convsvc at %s", self.client_settings.address)
        return self

    async def __aexit__(self, exc_type: object, exc_value: object, traceback: object) -> None:
        tasks = [relay.stop() for relay in self._relays.values()]
        tasks += [follower.stop() for follower in self._followers.values()]
        self._relays.clear()
        self._followers.clear()
        await asyncio.gather(*tasks)
        if self._mirror is not None:
            await self._mirror.stop()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._sync_client is not None:
            self._sync_client.close()

    @property
    def client(self) -> AsyncConvsvcClient:
        if self._client is None:
            raise RuntimeError("RemoteConversationManager is used before `async with` opened it")
        return self._client

    @property
    def mirror(self) -> ConversationMirror:
        """The watched copy of the service's conversations that answers OpenHands' lists."""
        if self._mirror is None:
            raise RuntimeError("RemoteConversationManager is used before `async with` opened it")
        return self._mirror

    @property
    def sync_client(self) -> ConvsvcClient:
        if self._sync_client is None:
            raise RuntimeError("RemoteConversationManager is used before `async with` opened it")
        return self._sync_client

    # -- conversations ----------------------------------------------------------------------

    async def maybe_start_agent_loop(
        self,
        sid: str,
        settings: Settings,
        user_id: str | None,
        initial_user_msg: MessageAction | None = None,
        replay_json: str | None = None,
    ) -> AgentLoopInfo:
        conversation = await self.client.start_conversation(
            sid,
            user_id=_user(user_id),
            settings=settings_to_json(settings),
            initial_user_message=event_to_dict(initial_user_msg) if initial_user_msg else None,
            replay_events=json.loads(replay_json) if replay_json else (),
        )
        self._follow_metadata(sid, user_id, settings, conversation.latest_event_id + 1)
        await self._settle(lambda mirror: mirror.has_conversation(sid))
        return self._loop_info(conversation, user_id)

    async def join_conversation(
        self, sid: str, connection_id: str, settings: Settings, user_id: str | None
    ) -> AgentLoopInfo | None:
        await self.sio.enter_room(connection_id, ROOM_KEY.format(sid=sid))
        join = _Join(sid, _user(user_id), settings_to_json(settings))
        conversation = await self._join(connection_id, join)
        self._joins[connection_id] = join
        self._follow_metadata(sid, user_id, settings, conversation.latest_event_id + 1)
        replay_by_openhands = replays_through_join()
        relay = ConnectionRelay(
            client=self.client,
            emit=lambda data: self.sio.emit("oh_event", data, to=connection_id),
            conversation_id=sid,
            user_id=_user(user_id),
            start_id=_requested_start_id(self.sio.get_environ(connection_id)),
            backlog_end=conversation.latest_event_id,
            replay_by_openhands=replay_by_openhands,
        )
        previous = self._relays.pop(connection_id, None)
        if previous is not None:
            await previous.stop()
        self._relays[connection_id] = relay
        relay.start()
        await self._settle(lambda mirror: mirror.has_connection(sid, connection_id))
        store = RemoteEventStore(
            self.sync_client,
            sid,
            user_id,
            on_search_complete=relay.backlog_replayed if replay_by_openhands else None,
        )
        return self._loop_info(conversation, user_id, store)

    async def send_to_event_stream(self, connection_id: str, data: dict[str, Any]) -> None:
        request_id = new_request_id()  # the same for the retry below: the event lands once
        join = self._joins.get(connection_id)
        asked = _state_asked(data)
        if asked is not None and join is not None and await self._agent_asked(join, asked):
            return
        try:
            await self._send_riding_out_restarts(connection_id, data, request_id)
        except ConvsvcClientError as exc:
            join = self._joins.get(connection_id)
            # A restarted service has forgotten connections and stopped loops; a connection of
            # this process joins again (restarting the loop) and the event is sent once more.
            if join is None or exc.reason not in (
                "CONNECTION_NOT_FOUND",
                "CONVERSATION_NOT_RUNNING",
            ):
                raise
            log.info("rejoining %s to %s after a service restart", connection_id, join.sid)
            await self._join(connection_id, join)
            await self.client.send_event(data, connection_id=connection_id, request_id=request_id)

    async def _send_riding_out_restarts(
        self, connection_id: str, data: dict[str, Any], request_id: str
    ) -> None:
        try:
            await self.client.send_event(data, connection_id=connection_id, request_id=request_id)
        except ServiceUnavailableError:
            # The service is down or restarting, and the channel may still be backing off
            # when it is back: the call's own retries are spent by then. Wait for the
            # channel (up to the client's timeout) and send once more: the same request id
            # makes the event land once.
            log.info("convsvc is unreachable; waiting for it to send %s's event", connection_id)
            await self.client.wait_until_ready(self.client.settings.timeout_seconds)
            await self.client.send_event(data, connection_id=connection_id, request_id=request_id)

    async def _agent_asked(self, join: _Join, state: str) -> bool:
        """The browser's pause, resume or stop as ControlAgent, its approval or rejection of
        a pending action as ConfirmAction (each answers once the agent took it); False when
        that does not apply here (the conversation does not run here, no action is pending):
        the browser's event is then sent as it is."""
        try:
            if (control := _CONTROLS.get(state)) is not None:
                await self.client.control_agent(join.sid, control)
            elif (decision := _DECISIONS.get(state)) is not None:
                pending = (await self.client.get_conversation(join.sid)).pending_action
                if pending is None:
                    return False
                await self.client.confirm_action(join.sid, pending.event_id, decision)
            else:
                return False
        except ConvsvcClientError as exc:
            if exc.reason == "AGENT_UNRESPONSIVE":
                # convsvc told the conversation's viewers; the browser keeps its socket.
                log.warning("the agent of %s did not answer %s", join.sid, state)
                return True
            if exc.reason == "ACTION_NOT_PENDING":
                # Another viewer decided first (or the agent moved on): nothing left to do.
                log.info("the action of %s was no longer pending", join.sid)
                return True
            if exc.reason in ("CONVERSATION_NOT_RUNNING", "CONVERSATION_NOT_FOUND"):
                return False
            raise
        return True

    async def send_event_to_conversation(self, sid: str, data: dict[str, Any]) -> None:
        await self.client.send_event(data, conversation_id=sid)

    async def disconnect_from_session(self, connection_id: str) -> None:
        self._joins.pop(connection_id, None)
        relay = self._relays.pop(connection_id, None)
        if relay is not None:
            await relay.stop()
        await self.client.disconnect(connection_id)
        await self._settle(lambda mirror: not mirror.holds_connection(connection_id))

    async def close_session(self, sid: str) -> None:
        follower = self._followers.pop(sid, None)
        if follower is not None:
            await follower.stop()
        await self.client.close_conversation(sid)
        await self._settle(lambda mirror: not mirror.has_conversation(sid))

    # -- what OpenHands' routes ask ---------------------------------------------------------

    async def attach_to_conversation(
        self, sid: str, user_id: str | None = None
    ) -> RemoteConversation | None:
        try:
            await self.client.get_conversation(sid, user_id=_user(user_id))
        except NotFoundError:
            return None
        store = RemoteEventStore(self.sync_client, sid, user_id)
        return RemoteConversation(sid, user_id, store, self.config)

    async def detach_from_conversation(self, conversation: Any) -> None:
        """Nothing is held for an attached conversation."""

    async def get_running_agent_loops(
        self, user_id: str | None = None, filter_to_sids: set[str] | None = None
    ) -> set[str]:
        return {c.conversation_id for c in await self._running(user_id, filter_to_sids)}

    async def get_connections(
        self, user_id: str | None = None, filter_to_sids: set[str] | None = None
    ) -> dict[str, str]:
        if filter_to_sids is not None and not filter_to_sids:
            return {}
        if self._mirror is not None and self._mirror.live:
            return self._mirror.connections(_user(user_id), filter_to_sids)
        return {
            connection.connection_id: connection.conversation_id
            async for connection in self.client.iter_connections(
                user_id=_user(user_id), conversation_ids=sorted(filter_to_sids or ())
            )
        }

    async def get_agent_loop_info(
        self, user_id: str | None = None, filter_to_sids: set[str] | None = None
    ) -> list[AgentLoopInfo]:
        return [
            self._loop_info(conversation, user_id)
            for conversation in await self._running(user_id, filter_to_sids)
        ]

    def get_agent_session(self, sid: str) -> RemoteAgentSession:
        """A stand-in for the agent session, which runs on an agent worker: it answers what
        OpenHands' routes ask of it (0.62's /microagents) from this process."""
        return RemoteAgentSession(sid)

    async def request_llm_completion(
        self, sid: str, service_id: str, llm_config: Any, messages: list[dict[str, str]]
    ) -> str:
        """Answered by the conversation's LLM on its agent worker, which accounts the cost,
        as OpenHands' standalone manager answers it from the conversation's registry."""
        config = llm_config_to_json(llm_config)
        try:
            return await self.client.complete_with_agent_llm(
                sid, messages, service_id=service_id, llm_config=config
            )
        except NotFoundError:
            # OpenHands 0.62's remember-prompt route passes (service_id, sid) swapped.
            return await self.client.complete_with_agent_llm(
                service_id, messages, service_id=sid, llm_config=config
            )

    # -- helpers ----------------------------------------------------------------------------

    async def _join(self, connection_id: str, join: _Join) -> Conversation:
        conversation, _ = await self.client.join_conversation(
            join.sid,
            connection_id,
            user_id=join.user_id,
            settings=join.settings,
            client_instance_id=self.client_instance_id,
        )
        return conversation

    async def _running(
        self, user_id: str | None, filter_to_sids: set[str] | None
    ) -> list[Conversation]:
        if filter_to_sids is not None and not filter_to_sids:
            return []
        if self._mirror is not None and self._mirror.live:
            return self._mirror.running(_user(user_id), filter_to_sids)
        return [
            conversation
            async for conversation in self.client.iter_conversations(
                user_id=_user(user_id), conversation_ids=sorted(filter_to_sids or ())
            )
        ]

    async def _settle(self, reflected: Callable[[ConversationMirror], bool]) -> None:
        """Reads after a change this process made see it (see ConversationMirror.settle)."""
        if self._mirror is not None:
            await self._mirror.settle(reflected)

    def _loop_info(
        self,
        conversation: Conversation,
        user_id: str | None,
        store: RemoteEventStore | None = None,
    ) -> AgentLoopInfo:
        return AgentLoopInfo(
            conversation_id=conversation.conversation_id,
            url=None,
            session_api_key=None,
            event_store=store
            or RemoteEventStore(self.sync_client, conversation.conversation_id, user_id),
            status=_STATUS[conversation.status],
        )

    def _follow_metadata(
        self, sid: str, user_id: str | None, settings: Settings, start_id: int
    ) -> None:
        follower = self._followers.get(sid)
        if follower is not None and follower.running:
            return
        follower = MetadataFollower(
            self.client,
            sid,
            user_id,
            settings,
            self.config,
            self.server_config,
            lambda data: self.sio.emit("oh_event", data, to=ROOM_KEY.format(sid=sid)),
        )
        self._followers[sid] = follower
        follower.start(start_id)

    async def _heartbeat_loop(self) -> None:
        interval = 10.0
        while True:
            try:
                result = await self.client.heartbeat(self.client_instance_id)
                interval = max(result.ttl_seconds / 3, 0.5)
            except ConvsvcClientError as exc:
                log.warning("heartbeat to convsvc failed: %s", exc)
            await asyncio.sleep(interval)  # the next beat; nothing to wait on but time
