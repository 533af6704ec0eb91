"""``openhands``: OpenHands' AgentSession (an agent such as CodeActAgent, its LLM and a
runtime) for one conversation, in its own process.

The conversation's history is written into an in-memory file store before the session is
built, so OpenHands' EventStream continues the log's ids and the controller rebuilds the
agent's history from the events (no ``agent_state.pkl`` is kept: a restored agent waits for
the user's next message, as OpenHands' own restore does). Every event the stream assigns is
relayed in id order; runtime status goes out as status updates.

Imported by the zygote before it forks (OpenHands takes seconds to import).
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import MappingProxyType
from typing import Any

import openhands.agenthub  # noqa: F401 - registers the agents
from openhands.core.config import load_openhands_config
from openhands.core.schema import AgentState
from openhands.events import EventSource
from openhands.events.action import MessageAction
from openhands.events.event import Event
from openhands.events.serialization import event_from_dict, event_to_dict
from openhands.events.stream import EventStreamSubscriber
from openhands.integrations.provider import CustomSecret, ProviderToken
from openhands.integrations.service_types import ProviderType
from openhands.server.session.conversation_init_data import ConversationInitData
from openhands.storage.locations import get_conversation_event_filename
from openhands.storage.memory import InMemoryFileStore
from pydantic import SecretStr

from convworker.kinds import openhands_compat as compat
from convworker.kinds.base import JsonObject, LoopRunner

_CALLBACK_ID = "convworker-relay"
log = logging.getLogger(__name__)


def warm_up() -> None:
    """Runs here, in the zygote, what every conversation runs first: litellm's first-call
    loading (the OpenAI SDK's resources, about 0.4 s, and its tokenizer, 0.2 s), building a
    CodeActAgent and its LLM, one event's serialisation. Their lazy imports and caches are
    then shared by the forked processes instead of built again in each (2 MiB less private
    memory per conversation, measured). No thread is started: the zygote must fork safely."""
    try:
        import litellm
        import openai.resources  # noqa: F401 - litellm imports it lazily on the first call

        litellm.token_counter(model="gpt-4o", messages=[{"role": "user", "content": "warm"}])
        config = load_openhands_config()
        config.runtime = "cli"
        registry = None
        if compat.HAS_LLM_REGISTRY:
            from openhands.llm.llm_registry import LLMRegistry

            registry = LLMRegistry(config, "CodeActAgent")
        compat.agent("CodeActAgent", config, registry)
        event_from_dict(event_to_dict(MessageAction(content="warm")))
    except Exception:  # only an optimisation: each conversation pays instead
        log.warning("openhands: warming up failed", exc_info=True)


_SECRET_FIELDS = ("git_provider_tokens", "custom_secrets")


def init_data(settings: JsonObject) -> ConversationInitData:
    """OpenHands' ConversationInitData from the settings JSON the web tier sent."""
    plain = {k: v for k, v in settings.items() if k not in _SECRET_FIELDS}
    known = set(ConversationInitData.model_fields)
    data = ConversationInitData.model_validate({k: v for k, v in plain.items() if k in known})
    tokens = settings.get("git_provider_tokens") or {}
    secrets = settings.get("custom_secrets") or {}
    updates: dict[str, Any] = {}
    if tokens:
        updates["git_provider_tokens"] = MappingProxyType(
            {
                ProviderType(provider): ProviderToken(
                    token=SecretStr(value.get("token") or ""),
                    user_id=value.get("user_id"),
                    host=value.get("host"),
                )
                for provider, value in tokens.items()
            }
        )
    if secrets:
        updates["custom_secrets"] = MappingProxyType(
            {
                name: CustomSecret(
                    secret=SecretStr(value.get("secret") or ""),
                    description=value.get("description") or "",
                )
                for name, value in secrets.items()
            }
        )
    return data.model_copy(update=updates) if updates else data


class OpenHandsRunner(LoopRunner):
    """One AgentSession, relaying its EventStream."""

    async def start(self) -> None:
        assignment = self.assignment
        self._loop = asyncio.get_running_loop()
        self._next_id = assignment.next_event_id
        self._unsent: dict[int, JsonObject] = {}
        self._deliveries: dict[int, str] = {}
        sid = assignment.conversation_id
        user_id = assignment.user_id or None
        settings = init_data(assignment.settings)
        config = load_openhands_config()
        config.runtime = assignment.worker_options.get("runtime", "cli")
        assignment.workspace.mkdir(parents=True, exist_ok=True)
        config.workspace_base = str(assignment.workspace)
        agent_cls = settings.agent or config.default_agent
        if settings.confirmation_mode is not None:
            config.security.confirmation_mode = settings.confirmation_mode
        if settings.security_analyzer:
            config.security.security_analyzer = settings.security_analyzer
        llm_config = config.get_llm_config()
        llm_config.model = settings.llm_model or llm_config.model
        llm_config.api_key = settings.llm_api_key
        llm_config.base_url = settings.llm_base_url
        config.set_llm_config(llm_config)
        max_iterations = settings.max_iterations or config.max_iterations

        file_store = InMemoryFileStore()
        for event in assignment.history:
            file_store.write(
                get_conversation_event_filename(sid, event["id"], user_id), json.dumps(event)
            )
        self.session, registry = compat.agent_session(
            sid, file_store, self._status, user_id, config, agent_cls
        )
        self._registry = registry
        self.session.event_stream.subscribe(
            EventStreamSubscriber.SERVER, self._from_stream, _CALLBACK_ID
        )
        agent = compat.agent(agent_cls, config, registry)
        initial = None
        if assignment.initial_user_message is not None:
            initial = event_from_dict(dict(assignment.initial_user_message))
            if not isinstance(initial, MessageAction):
                initial = None
        replay_json = json.dumps(assignment.replay_events) if assignment.replay_events else None
        await self.session.start(
            runtime_name=config.runtime,
            config=config,
            agent=agent,
            max_iterations=max_iterations,
            max_budget_per_task=getattr(settings, "max_budget_per_task", None)
            or config.max_budget_per_task,
            agent_to_llm_config=config.get_agent_to_llm_config_map(),
            agent_configs=config.get_agent_configs(),
            git_provider_tokens=settings.git_provider_tokens,
            custom_secrets=settings.custom_secrets,
            selected_repository=settings.selected_repository,
            selected_branch=settings.selected_branch,
            initial_message=initial,
            conversation_instructions=settings.conversation_instructions,
            replay_json=replay_json,
        )

    async def deliver(self, delivery_id: str, payload: JsonObject) -> None:
        event = event_from_dict(dict(payload))
        # add_event numbers the event; the relay of that id runs on this loop after we
        # return, so the delivery id is known by then.
        self.session.event_stream.add_event(event, EventSource.USER)
        self._deliveries[event.id] = delivery_id

    async def complete(
        self, service_id: str, llm_config: JsonObject, messages: list[JsonObject]
    ) -> str:
        # OpenHands' LLM calls are synchronous: a thread keeps this process's loop free.
        return await asyncio.to_thread(
            compat.extraneous_completion, self._registry, service_id, llm_config, messages
        )

    async def stop(self) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            await session.close()

    # -- relays ------------------------------------------------------------------------------

    def _from_stream(self, event: Event) -> None:
        """OpenHands' callback thread: hand the event (secrets already hidden by the stream)
        to the runner's loop."""
        data = event_to_dict(event)
        self._loop.call_soon_threadsafe(self._relay, data)

    def _relay(self, data: JsonObject) -> None:
        """Sends events in id order (callbacks may see them out of order)."""
        self._unsent[int(data["id"])] = data
        while self._next_id in self._unsent:
            event = self._unsent.pop(self._next_id)
            self.outbox.event(
                self._next_id,
                str(event.get("source", "environment")),
                event,
                self._deliveries.pop(self._next_id, ""),
            )
            self._next_id += 1

    def _status(self, msg_type: Any, status_id: Any, message: Any) -> None:
        # 0.62 passes enums (RuntimeStatus); the browser gets their string values.
        msg_type, status_id = (str(getattr(v, "value", v)) for v in (msg_type, status_id))
        self.outbox.status(
            {"status_update": True, "type": msg_type, "id": status_id, "message": str(message)}
        )
        if msg_type == "error":  # as OpenHands' own session does: the agent stops
            controller = getattr(getattr(self, "session", None), "controller", None)
            if controller is not None:
                asyncio.run_coroutine_threadsafe(
                    controller.set_agent_state_to(AgentState.ERROR), self._loop
                )
