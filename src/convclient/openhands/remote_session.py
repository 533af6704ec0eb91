"""A stand-in for OpenHands' AgentSession, which runs on an agent worker.

OpenHands 0.62's ``/microagents`` route reads ``agent_session.memory``: the microagents the
conversation's agent knows. The stand-in loads the ones every conversation has (OpenHands'
global microagents and the user's ``~/.openhands/microagents``) here; microagents of a
selected repository live in the worker's workspace and are not listed.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any


class RemoteMemory:
    """The microagents part of OpenHands' Memory."""

    def __init__(self) -> None:
        from openhands.memory.memory import GLOBAL_MICROAGENTS_DIR, USER_MICROAGENTS_DIR
        from openhands.microagent import load_microagents_from_dir

        self.repo_microagents: dict[str, Any] = {}
        self.knowledge_microagents: dict[str, Any] = {}
        for directory in (GLOBAL_MICROAGENTS_DIR, USER_MICROAGENTS_DIR):
            if not Path(directory).exists():
                continue
            repo, knowledge = load_microagents_from_dir(directory)
            self.repo_microagents.update(repo)
            self.knowledge_microagents.update(knowledge)


class RemoteAgentSession:
    """What OpenHands' routes read of a conversation's AgentSession."""

    def __init__(self, sid: str) -> None:
        self.sid = sid

    @cached_property
    def memory(self) -> RemoteMemory:
        return RemoteMemory()
