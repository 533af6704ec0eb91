"""What a conversation process runs: a :class:`LoopRunner` for one assignment.

A runner numbers its events itself, continuing the log from ``Assignment.next_event_id``
(convsvc appends an event only if its id is the next one), and logs the user events it is
delivered, echoing their delivery ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

JsonObject = dict[str, Any]


class Outbox(Protocol):
    """Where a runner's output goes (safe to call from any thread)."""

    def event(self, event_id: int, source: str, payload: JsonObject, delivery_id: str = "") -> None:
        """Sends one numbered event to convsvc."""

    def status(self, status: JsonObject) -> None:
        """Sends a transient status update (not logged)."""


@dataclass(frozen=True)
class Assignment:
    """One conversation to run, with everything logged before this run."""

    conversation_id: str
    assignment: int
    agent_kind: str
    user_id: str
    settings: JsonObject
    next_event_id: int
    initial_user_message: JsonObject | None
    replay_events: list[JsonObject]
    history: list[JsonObject]
    """Events 0 to next_event_id - 1, each the whole OpenHands event dict."""
    workspace: Path
    """The conversation's working directory (the CLI runtime's workspace)."""
    worker_options: JsonObject
    """The worker's own settings for its loops (e.g. {"runtime": "cli"}), not the user's."""


class LoopRunner(ABC):
    """One conversation's agent loop inside its process."""

    def __init__(self, assignment: Assignment, outbox: Outbox) -> None:
        self.assignment = assignment
        self.outbox = outbox

    @abstractmethod
    async def start(self) -> None:
        """Sets the loop up from the history; logs the initial message, if any."""

    @abstractmethod
    async def deliver(self, delivery_id: str, payload: JsonObject) -> None:
        """Logs a user event (echoing ``delivery_id``) and acts on it."""

    async def complete(
        self, service_id: str, llm_config: JsonObject, messages: list[JsonObject]
    ) -> str:
        """One completion from the loop's LLM outside the conversation."""
        raise NotImplementedError(f"{self.assignment.agent_kind} has no LLM")

    @abstractmethod
    async def stop(self) -> None:
        """Stops the loop; nothing is sent afterwards."""
