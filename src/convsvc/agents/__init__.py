"""Agent loop plug-ins, by name: the built-in ``echo`` and any installed under the
``convsvc.agents`` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from convsvc.agents.base import AgentContext, AgentFactory, AgentLoop, agent_state_changed
from convsvc.agents.echo import EchoAgent

BUILTIN_AGENTS: dict[str, type[AgentLoop]] = {EchoAgent.name: EchoAgent}


def available_agents() -> dict[str, type[AgentLoop]]:
    """The built-in agents plus those installed as ``convsvc.agents`` entry points."""
    agents = dict(BUILTIN_AGENTS)
    for entry in entry_points(group="convsvc.agents"):
        agents[entry.name] = entry.load()
    return agents


__all__ = [
    "AgentContext",
    "AgentFactory",
    "AgentLoop",
    "EchoAgent",
    "agent_state_changed",
    "available_agents",
]
