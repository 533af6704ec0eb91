"""Run control's rules: what pausing, resuming and interrupting an agent writes, when each
has something to do, which agent state answers it, and when an agent counts as busy.

The events are the ones OpenHands' browser sends (``change_agent_state``), so an OpenHands
agent (on a worker) handles them itself; the echo agents follow the same states. An agent
answers a control by reporting the state it asked for (an ``agent_state_changed``
observation); an agent that does not, within the control timeout, is reported unresponsive.
"""

from __future__ import annotations

from collections.abc import Callable

from convsvc.domain import AgentControl, JsonObject

BUSY_STATES = frozenset({"running"})
"""An agent is busy while it steps ("running"): a message sent then waits for it (enqueue),
is refused (reject) or interrupts it (interrupt). In every other state (loading,
awaiting_user_input, paused, stopped, finished, error, awaiting_user_confirmation, ...) a
message is taken at once, as OpenHands takes it."""

WAITING_FOR_USER = frozenset({"awaiting_user_input", "finished", "stopped", "error", "rejected"})
"""States in which the agent does nothing until the user speaks: nothing to pause or
interrupt."""

_ASKED_FOR = {
    AgentControl.PAUSE: "paused",
    AgentControl.RESUME: "running",
    AgentControl.INTERRUPT: "stopped",
}


def change_agent_state(control: AgentControl) -> JsonObject:
    """The user event a control writes: what OpenHands' browser sends for it."""
    return {
        "action": "change_agent_state",
        "args": {"agent_state": _ASKED_FOR[control], "thought": ""},
    }


def has_effect(control: AgentControl, state: str) -> bool:
    """Whether the control changes anything for an agent in ``state``; one that does not
    writes nothing (a retried or crossed control is then harmless)."""
    if control is AgentControl.RESUME:
        return state == "paused"
    if control is AgentControl.PAUSE:
        return state != "paused" and state not in WAITING_FOR_USER
    return state not in WAITING_FOR_USER


def answered_by(control: AgentControl) -> Callable[[str], bool]:
    """Whether a state the agent reports answers the control."""
    if control is AgentControl.RESUME:
        return lambda state: state != "paused"
    asked = _ASKED_FOR[control]
    return lambda state: state == asked
