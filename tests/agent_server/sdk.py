"""The SDK as its users drive an agent-server: an agent spec, a RemoteWorkspace and a
RemoteConversation (its own HTTP and WebSocket client)."""

from __future__ import annotations

import uuid
from typing import Any

from openhands.sdk import LLM, Agent, Tool
from openhands.sdk.conversation.impl.remote_conversation import RemoteConversation
from openhands.sdk.conversation.request import StartConversationRequest
from openhands.sdk.workspace import RemoteWorkspace
from pydantic import SecretStr

from tests.agent_server.conftest import Backend, Recorder
from tests.agent_server.fake_llm import SdkFakeLLM

LLM_KEY = "sk-agent-server-test-9f8e7d6c"


def agent(llm: SdkFakeLLM) -> Agent:
    return Agent(
        llm=LLM(
            model="openai/gpt-4o",
            base_url=llm.base_url,
            api_key=SecretStr(LLM_KEY),
            usage_id="agent",
            num_retries=0,
        ),
        tools=[Tool(name="terminal")],
    )


def create_body(llm: SdkFakeLLM, working_dir: str, conversation_id: str) -> dict[str, Any]:
    """A create request's JSON, as a raw HTTP client sends it (the LLM key included)."""
    return {
        "agent": agent(llm).model_dump(mode="json", context={"expose_secrets": True}),
        "workspace": {"working_dir": working_dir},
        "conversation_id": conversation_id,
    }


def workspace(backend: Backend, working_dir: str, key: str | None = None) -> RemoteWorkspace:
    return RemoteWorkspace(host=backend.url, working_dir=working_dir, api_key=key or backend.key)


def start(
    backend: Backend,
    llm: SdkFakeLLM,
    working_dir: str,
    initial: str | None = None,
    key: str | None = None,
    recorder: Recorder | None = None,
    **request: Any,
) -> tuple[RemoteConversation, Recorder]:
    """Creates a conversation (with an initial message, which runs at once) through the
    SDK's ``RemoteConversation.create``, recording every event its socket delivers."""
    recorder = recorder or Recorder()
    body: dict[str, Any] = {
        "agent": agent(llm),
        "workspace": {"working_dir": working_dir},
        "conversation_id": uuid.uuid4(),
        **request,
    }
    if initial is not None:
        body["initial_message"] = {"role": "user", "content": [{"type": "text", "text": initial}]}
    conversation = RemoteConversation.create(
        workspace(backend, working_dir, key),
        StartConversationRequest.model_validate(body),
        callbacks=[recorder],
        visualizer=None,
    )
    conversation.delete_on_close = False
    recorder.synced = lambda: list(conversation.state.events)
    return conversation, recorder


def attach(
    backend: Backend, conversation_id: str, working_dir: str, key: str | None = None
) -> RemoteConversation:
    """Connects to an existing conversation with the agent it was saved with."""
    conversation = RemoteConversation.attach(
        workspace(backend, working_dir, key), uuid.UUID(conversation_id), visualizer=None
    )
    conversation.delete_on_close = False
    return conversation


def is_finish(event: Any) -> bool:
    return type(event).__name__ == "ActionEvent" and getattr(event, "tool_name", "") == "finish"


def status_is(*statuses: str) -> Any:
    def found(event: Any) -> bool:
        if type(event).__name__ != "ConversationStateUpdateEvent":
            return False
        value = event.value
        if event.key == "execution_status":
            return str(value) in statuses
        return event.key == "full_state" and str(value.get("execution_status")) in statuses

    return found


_SETTLED = ("finished", "paused", "error", "stuck", "idle")


def run_over(recorder: Recorder, timeout: float = 60) -> None:
    """Waits until the run that made the last ``finish`` is over: the server's post-run state
    snapshot (a ``full_state`` with a settled status) came after that finish, as the SDK's
    own blocking ``run()`` waits for it. (Right after the finish action, the run's last
    events and that snapshot may still be on their way: a message sent then, and a run()
    called then, would take the old snapshot for the new run's end.)"""

    def over() -> bool:
        events = recorder.events
        finishes = [i for i, e in enumerate(events) if is_finish(e)]
        if finishes:
            start = finishes[-1]
        elif any(is_finish(e) for e in recorder.synced()):
            start = 0  # it finished before the socket subscribed: its first snapshot says so
        else:
            return False
        return any(
            type(e).__name__ == "ConversationStateUpdateEvent"
            and e.key == "full_state"
            and str(e.value.get("execution_status")) in _SETTLED
            for e in events[start:]
        )

    recorder.wait_until(over, "the run over", timeout)
