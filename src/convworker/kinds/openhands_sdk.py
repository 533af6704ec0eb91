"""``openhands-sdk``: one OpenHands 1.x conversation (openhands-sdk, the agent-server's own
conversation service) in its own process, its durable state in convsvc's log.

The process runs the agent-server's ``ConversationService`` for this one conversation, on a
private scratch directory: the SDK builds the agent, runs, pauses and interrupts exactly as a
stock agent-server does. What the stock server keeps in files goes into convsvc's log
instead, wrapped so that convsvc's rules hold (one ``observation`` per event):

- every SDK event, in the SDK's own order, as ``{"observation": "agent_server_event",
  "event": <the SDK event, its UUID and timestamp kept>}``;
- at every change of the execution status, an ``agent_state_changed`` observation (the state
  convsvc's run control, search and webhooks read) whose ``agent_server`` extras hold the
  stock files a restart needs (``meta.json`` and ``base_state.json``, their secrets encrypted
  by the SDK's cipher with the key the gateway passes in memory) and the conversation's
  ``ConversationInfo`` for reads while nothing runs it;
- state updates (``ConversationStateUpdateEvent``) as transient status updates, which the
  gateway relays to WebSocket clients.

A restore writes those files and events back into a fresh scratch directory and lets the
SDK resume from them, as a stock agent-server does after a restart: a run cut short is
marked as an error, and the next message continues with the whole history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import uuid
from collections import deque
from pathlib import Path

from openhands.agent_server.conversation_service import ConversationService
from openhands.agent_server.models import (
    ConfirmationResponseRequest,
    trim_conversation_response_skills,
)
from openhands.sdk import Message, TextContent
from openhands.sdk.conversation.persistence_const import BASE_STATE, EVENT_FILE_PATTERN
from openhands.sdk.conversation.request import StartConversationRequest
from openhands.sdk.event import ConversationStateUpdateEvent, Event, MessageEvent
from openhands.sdk.utils.cipher import Cipher

from convworker.kinds.base import JsonObject, LoopRunner

log = logging.getLogger(__name__)

SDK_EVENT = "agent_server_event"
"""The observation name an SDK event is logged under (the gateway shows only these)."""
CONTROL_STATES = {"paused": "pause", "stopped": "interrupt", "running": "run"}
"""``change_agent_state`` requests (convsvc's run control) and what each does here."""
_AGENT_STATES = {
    "idle": "awaiting_user_input",
    "running": "running",
    "paused": "paused",
    "waiting_for_confirmation": "awaiting_user_confirmation",
    "finished": "finished",
    "error": "error",
    "stuck": "error",
    "deleting": "stopped",
}
"""The SDK's execution status as the agent state convsvc knows (OpenHands' vocabulary)."""
_META = "meta.json"
_SOURCES = frozenset({"agent", "user", "environment"})


def warm_up() -> None:
    """Runs here, in the zygote, what every conversation runs first, so that each forked
    conversation starts warm: the SDK's tools imported and registered, litellm's lazy
    first-call loading (the OpenAI SDK's resources and its tokenizer), an agent and its LLM
    built, one event serialised. No thread is started: the zygote must fork safely."""
    try:
        import litellm
        import openai.resources  # noqa: F401 - litellm imports it lazily on the first call
        from openhands.sdk import LLM, Agent, Tool
        from openhands.tools.preset.default import register_default_tools

        register_default_tools(enable_browser=False)
        litellm.token_counter(model="gpt-4o", messages=[{"role": "user", "content": "warm"}])
        agent = Agent(
            llm=LLM(model="openai/gpt-4o", usage_id="warm"), tools=[Tool(name="terminal")]
        )
        MessageEvent(
            source="user", llm_message=Message(role="user", content=[TextContent(text="warm")])
        ).model_dump(mode="json")
        agent.model_dump(mode="json")
    except Exception:  # only an optimisation: each conversation pays instead
        log.warning("openhands-sdk: warming up failed", exc_info=True)


def agent_state_of(execution_status: str) -> str:
    return _AGENT_STATES.get(execution_status, "awaiting_user_input")


class AgentServerRunner(LoopRunner):
    """One conversation of the agent-server's ConversationService, relayed to convsvc."""

    async def start(self) -> None:
        assignment = self.assignment
        settings = assignment.settings
        self._next_id = assignment.next_event_id
        self._conversation_uuid = uuid.UUID(assignment.conversation_id)
        self._scratch = Path(tempfile.mkdtemp(prefix="convworker-sdk-"))
        self._deliveries: list[str] = []
        self._logged: deque[str] = deque(maxlen=256)
        """Ids of the SDK events logged last (a fan-out notice about one is not new)."""
        self._interrupting = False
        self._reported_status = ""
        self._lock = asyncio.Lock()
        conversations_dir = self._scratch / "conversations"
        restored = self._restore_files(conversations_dir / self._conversation_uuid.hex)
        secret_key = settings.get("secret_key") or ""
        self._service = ConversationService(
            conversations_dir=conversations_dir,
            cipher=Cipher(secret_key) if secret_key else None,
            lease_ttl_seconds=0,  # convsvc's lease fences this conversation, not a file
            max_concurrent_runs=1,
            conversation_worktree_root=self._scratch / "worktrees",
        )
        await self._service.__aenter__()
        if not restored:
            request = StartConversationRequest.model_validate(
                {
                    **settings["request"],
                    "conversation_id": str(self._conversation_uuid),
                    "initial_message": None,
                    "workspace": {"working_dir": str(self._workspace(settings))},
                }
            )
            await self._service.start_conversation(request)
        event_service = await self._service.get_event_service(self._conversation_uuid)
        if event_service is None:
            raise RuntimeError(f"conversation {assignment.conversation_id} did not start")
        self._event_service = event_service
        await event_service.subscribe_to_events(self._on_event)
        await self._relay_new_events()
        await self._report_status(force=True)
        initial = assignment.initial_user_message
        if initial is not None and not restored:
            await self._send_message(initial, delivery_id="")

    def _workspace(self, settings: JsonObject) -> Path:
        """The client's working directory when this worker allows it, else its own."""
        wanted = (settings.get("request") or {}).get("workspace") or {}
        named = wanted.get("working_dir") if isinstance(wanted, dict) else None
        if named and self.assignment.worker_options.get("allow_client_workspace"):
            return Path(named)
        return self.assignment.workspace

    def _restore_files(self, conversation_dir: Path) -> bool:
        """Writes the stock files of a conversation from its history; False when the
        history holds none (a new conversation)."""
        snapshot: JsonObject | None = None
        events: list[JsonObject] = []
        for event in self.assignment.history:
            if event.get("observation") == SDK_EVENT:
                events.append(event["event"])
            elif event.get("observation") == "agent_state_changed":
                files = (event.get("extras") or {}).get("agent_server")
                if files:
                    snapshot = files
        self._relayed = len(events)
        if snapshot is None:
            return False
        events_dir = conversation_dir / "events"
        events_dir.mkdir(parents=True)
        (conversation_dir / _META).write_text(snapshot["meta"])
        (conversation_dir / BASE_STATE).write_text(snapshot["base_state"])
        for index, event in enumerate(events):
            name = EVENT_FILE_PATTERN.format(idx=index, event_id=event["id"])
            (events_dir / name).write_text(json.dumps(event))
        return True

    # -- what convsvc delivers ---------------------------------------------------------------

    async def deliver(self, delivery_id: str, payload: JsonObject) -> None:
        action = payload.get("action")
        args = payload.get("args") or {}
        if action == "message":
            await self._send_message(payload, delivery_id)
            return
        # Everything else is logged as sent (its delivery acknowledged), then acted on.
        self._log(payload, "user", delivery_id)
        service = self._event_service
        if action == "change_agent_state":
            wanted = CONTROL_STATES.get(str(args.get("agent_state")))
            if wanted == "pause":
                await service.pause()
            elif wanted == "interrupt":
                self._interrupting = True
                await service.interrupt()
            elif wanted == "run":
                with contextlib.suppress(ValueError):  # already running: nothing to start
                    await service.run()
            await self._report_status(force=True)
        elif action == "agent_server_confirmation":
            await service.respond_to_confirmation(
                ConfirmationResponseRequest(
                    accept=bool(args.get("accept")), reason=str(args.get("reason") or "")
                )
            )

    async def _send_message(self, payload: JsonObject, delivery_id: str) -> None:
        details = payload.get("agent_server") or {}
        if details.get("message"):
            message = Message.model_validate(details["message"])
        else:  # a plain convsvc message (a gRPC client, not the agent-server API)
            text = str((payload.get("args") or {}).get("content", ""))
            message = Message(role="user", content=[TextContent(text=text)])
        run = bool(details.get("run", True))
        # The SDK logs the message as the next event: that event carries the delivery id.
        self._deliveries.append(delivery_id)
        await self._event_service.send_message(message, run)
        await self._relay_new_events()

    async def stop(self) -> None:
        service = getattr(self, "_service", None)
        try:
            if service is not None:
                await service.__aexit__(None, None, None)
        finally:
            shutil.rmtree(getattr(self, "_scratch", ""), ignore_errors=True)

    # -- relays ------------------------------------------------------------------------------

    async def _on_event(self, event: Event) -> None:
        """The conversation's fan-out (every event, persisted or not)."""
        async with self._lock:
            await self._relay_new_events_locked()
            # Most state updates are persisted (relayed above as events); the full-state
            # snapshots the service publishes after a run are not, and go out as status.
            if not isinstance(event, ConversationStateUpdateEvent):
                return
            if event.id not in self._logged:
                frame = event.model_dump(mode="json", exclude_none=True)
                # The gateway holds a frame back until the events before it reached the
                # client: a client that sees a run end then reads the events it made.
                self.outbox.status(
                    {"agent_server_frame": frame, "after_event_id": self._next_id - 1}
                )
            await self._report_status_locked(force=False)

    async def _relay_new_events(self) -> None:
        async with self._lock:
            await self._relay_new_events_locked()

    async def _relay_new_events_locked(self) -> None:
        """Logs the SDK's persisted events not yet logged, in the SDK's order (its event log
        is the order; callbacks may arrive later than their events)."""
        events = self._event_service.get_conversation().state.events
        while self._relayed < len(events):
            event = events[self._relayed]
            data = event.model_dump(mode="json", exclude_none=True)
            delivery = ""
            if isinstance(event, MessageEvent) and event.source == "user" and self._deliveries:
                delivery = self._deliveries.pop(0)
            source = str(event.source) if event.source in _SOURCES else "environment"
            self._log({"observation": SDK_EVENT, "event": data}, source, delivery)
            self._logged.append(event.id)
            self._relayed += 1

    async def _report_status(self, *, force: bool) -> None:
        async with self._lock:
            await self._report_status_locked(force=force)

    async def _report_status_locked(self, *, force: bool) -> None:
        """Logs the agent state and the files a restore needs when the status changed."""
        state = self._event_service.get_conversation().state
        status = str(getattr(state.execution_status, "value", state.execution_status))
        if status == self._reported_status and not force:
            return
        self._reported_status = status
        agent_state = agent_state_of(status)
        if agent_state == "paused" and self._interrupting:
            agent_state = "stopped"  # an interrupt is answered by "stopped" (run control)
        if status != "paused":
            self._interrupting = False
        conversation_dir = self._event_service.conversation_dir
        info = await self._service.get_conversation(self._conversation_uuid)
        files = {
            "meta": await asyncio.to_thread((conversation_dir / _META).read_text),
            "base_state": await asyncio.to_thread((conversation_dir / BASE_STATE).read_text),
            "info": (
                trim_conversation_response_skills(info).model_dump(mode="json")
                if info is not None
                else None
            ),
        }
        self._log(
            {
                "observation": "agent_state_changed",
                "content": "",
                "extras": {"agent_state": agent_state, "reason": "", "agent_server": files},
            },
            "environment",
        )

    def _log(self, payload: JsonObject, source: str, delivery_id: str = "") -> None:
        self.outbox.event(self._next_id, source, payload, delivery_id)
        self._next_id += 1
