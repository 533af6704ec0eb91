"""The plug-in interface for agent loops.

The engine owns each loop's lifecycle and calls it from one task per conversation, so a loop
never sees two calls at once. A loop talks back only through its :class:`AgentContext`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from convsvc.domain import EventSource, IdempotencyRecord, JsonObject, StoredEvent
from convsvc.errors import FailedPrecondition

IdempotencyFor = Callable[[int], IdempotencyRecord | None]
"""Builds the idempotency record of a send once its event id is known (None: no request id)."""


class AgentContext(Protocol):
    """What the engine offers a running loop."""

    @property
    def conversation_id(self) -> str:
        """The conversation the loop runs."""

    @property
    def user_id(self) -> str:
        """The user who owns the conversation ("" for none)."""

    @property
    def settings(self) -> Mapping[str, Any]:
        """The settings the loop was started with, secrets included (in memory only)."""

    async def emit(self, payload: JsonObject, source: EventSource) -> int:
        """Appends an event (an OpenHands event dict without id/timestamp/source) to the
        conversation's log and returns its id.

        It returns once the event has its place in the log, before it is durable: a loop's
        consecutive events then share one commit. Nobody sees the event before it is durable,
        and if it never becomes durable (the store failed), no later event does either; the
        next ``emit`` or ``flush`` then raises.
        """

    async def flush(self) -> None:
        """Returns once every event of the log so far, the user's included, is durable.

        Call it before an effect outside the log that must not happen for an event a crash
        could still lose (running a command, calling an external service).
        """

    @property
    def next_event_id(self) -> int:
        """The id the conversation's next event takes."""

    @property
    def closing(self) -> bool:
        """Whether the conversation is closing (nothing more can be appended)."""

    @property
    def initial_user_message(self) -> JsonObject | None:
        """The start's first user message, for loops that log it themselves."""

    @property
    def replay_events(self) -> Sequence[JsonObject]:
        """The start's recorded events to replay, for loops that log them themselves."""

    def append_numbered(
        self,
        first_id: int,
        events: Sequence[tuple[JsonObject, EventSource]],
        idempotency: IdempotencyRecord | None = None,
    ) -> asyncio.Future[None]:
        """For loops that number their own events: appends events whose ids run from
        ``first_id``, which must be the log's next (else ``EventOutOfSequence``), in one
        step; returns the future of their durability."""

    def read_history(self, end_id: int) -> AsyncIterator[list[StoredEvent]]:
        """The stored events with ids up to ``end_id``, in pages (after a flush)."""

    def publish_status(self, status: JsonObject) -> None:
        """Sends a transient status update to the conversation's live streams (not logged)."""


class AgentLoop(ABC):
    """One conversation's agent. Implementations are registered by name (see ``agents``).

    Before ``start`` the engine has already reported the agent state ``loading``; ``start``
    reports the state the agent is in once ready (normally ``awaiting_user_input``).
    """

    name: ClassVar[str]
    numbers_own_events: ClassVar[bool] = False
    """True for loops that number events themselves (agent workers): the engine then logs
    nothing of a start but ``loading``, and hands sends to ``submit_user_event`` rather than
    logging them."""

    def __init__(self, context: AgentContext) -> None:
        self.context = context

    @abstractmethod
    async def start(self) -> None:
        """Sets the agent up."""

    @abstractmethod
    async def on_user_event(self, event: JsonObject) -> None:
        """Handles one user event (``id`` included), in log order.

        The event has its place in the log but may not be durable yet (see
        ``AgentContext.flush``).
        """

    async def submit_user_event(
        self,
        payload: JsonObject,
        idempotency: IdempotencyFor,
        request: tuple[str, str] | None = None,
        *,
        payload_bytes: int = 0,
    ) -> int:
        """For loops that number their own events: has the user event logged by the loop and
        returns its id once it is durable. ``request`` (user, request id) lets a retry join
        a delivery its first attempt left on the way; ``payload_bytes`` is the payload's
        encoded size."""
        raise NotImplementedError(f"{self.name} does not number its own events")

    async def complete(
        self, service_id: str, llm_config: JsonObject, messages: Sequence[JsonObject]
    ) -> str:
        """One completion from the agent's LLM outside the conversation (OpenHands'
        request_llm_completion). Only loops with an LLM answer."""
        raise FailedPrecondition(
            f"the {self.name} agent has no LLM to answer completions",
            reason="COMPLETION_NOT_SUPPORTED",
        )

    async def stop(self) -> None:  # noqa: B027 - most loops hold nothing to release
        """Releases what the loop holds; the engine then reports the state ``stopped``."""


class AgentFactory(Protocol):
    """Makes a conversation's loop: an AgentLoop class, or a factory of loops of one kind
    (agent workers); either says whether its loops number their own events."""

    @property
    def numbers_own_events(self) -> bool: ...

    def __call__(self, context: Any) -> AgentLoop: ...


def agent_state_changed(state: str) -> JsonObject:
    """An OpenHands AgentStateChangedObservation for ``state``."""
    return {
        "observation": "agent_state_changed",
        "content": "",
        "extras": {"agent_state": state, "reason": ""},
        "message": f"Agent state changed to {state}",
    }
