"""The few places where OpenHands 0.41 and 0.62 differ for a worker, in one module.

0.62 builds LLMs through an ``LLMRegistry`` that a ``ConversationStats`` subscribes to (for
cost accounting), and passes it to the agent and the AgentSession; 0.41 builds the LLM itself.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from openhands.controller.agent import Agent
from openhands.core.config import OpenHandsConfig
from openhands.server.session.agent_session import AgentSession
from openhands.storage.files import FileStore

OPENHANDS_VERSION = tuple(int(part) for part in version("openhands-ai").split(".")[:2])
HAS_LLM_REGISTRY = OPENHANDS_VERSION >= (0, 54)


def agent_session(
    sid: str,
    file_store: FileStore,
    status_callback: Callable[[str, str, str], None],
    user_id: str | None,
    config: OpenHandsConfig,
    agent_cls: str,
) -> tuple[AgentSession, Any]:
    """The session, and the LLM registry where there is one (None in 0.41)."""
    if not HAS_LLM_REGISTRY:
        return AgentSession(sid, file_store, status_callback=status_callback, user_id=user_id), None
    from openhands.llm.llm_registry import LLMRegistry
    from openhands.server.services.conversation_stats import ConversationStats

    registry = LLMRegistry(config, agent_cls)
    stats = ConversationStats(file_store, sid, user_id)
    registry.subscribe(stats.register_llm)
    session = AgentSession(
        sid, file_store, registry, stats, status_callback=status_callback, user_id=user_id
    )
    return session, registry


def agent(agent_cls: str, config: OpenHandsConfig, registry: Any) -> Agent:
    agent_config = config.get_agent_config(agent_cls)
    if registry is not None:
        agent_config.runtime = config.runtime
        return Agent.get_cls(agent_cls)(agent_config, registry)
    from openhands.llm.llm import LLM

    llm = LLM(config=config.get_llm_config_from_agent(agent_cls))
    return Agent.get_cls(agent_cls)(llm, agent_config)


def extraneous_completion(
    registry: Any, service_id: str, llm_config: dict[str, Any], messages: list[dict[str, Any]]
) -> str:
    """What OpenHands' standalone manager answers request_llm_completion with: the
    conversation's LLM registry (0.54+), which accounts the cost; an LLM of its own before."""
    from openhands.core.config import LLMConfig

    config = LLMConfig.model_validate(llm_config)
    if registry is not None:
        answer: str = registry.request_extraneous_completion(service_id, config, messages)
        return answer
    from openhands.llm.llm import LLM

    response = LLM(config=config).completion(messages=messages)
    return str(response.choices[0].message.content or "").strip()


def accumulated_cost(session: AgentSession) -> dict[str, Any]:
    """Cost and tokens so far, as the conversation metadata keeps them."""
    controller = session.controller
    metrics = getattr(getattr(controller, "state", None), "metrics", None)
    if metrics is None:
        return {}
    usage = getattr(metrics, "accumulated_token_usage", None)
    return {
        "accumulated_cost": float(getattr(metrics, "accumulated_cost", 0.0) or 0.0),
        "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
        "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        "total_tokens": int(
            (getattr(usage, "prompt_tokens", 0) or 0)
            + (getattr(usage, "completion_tokens", 0) or 0)
        ),
    }
