"""Approvals' rules: which logged action awaits confirmation, what it shows, what deciding
about it writes and which agent state answers the decision.

OpenHands' confirmation mode stops before a risky action: the agent reports the state
``awaiting_user_confirmation`` and logs the action with ``confirmation_state``
"awaiting_confirmation" (in that order). The browser decides by sending
``change_agent_state`` with ``user_confirmed`` or ``user_rejected``; the agent then reports
that state, logs the action again as confirmed or rejected, and goes on. convsvc writes the
same event, so an OpenHands agent (on a worker) handles it itself; the echo agents follow
the same states.
"""

from __future__ import annotations

import json
from typing import Any

from convsvc.domain import ApprovalDecision, JsonObject, PendingAction, SecurityRisk

AWAITING_CONFIRMATION = "awaiting_user_confirmation"
"""The agent state in which a conversation shows its pending action."""

_DECIDED_STATE = {
    ApprovalDecision.APPROVE: "user_confirmed",
    ApprovalDecision.REJECT: "user_rejected",
}

_RISKS = {
    -1: SecurityRisk.UNKNOWN,
    0: SecurityRisk.LOW,
    1: SecurityRisk.MEDIUM,
    2: SecurityRisk.HIGH,
}

# Where each action type keeps what it would do (OpenHands' action dataclasses).
_CONTENT_ARGS = {
    "run": ("command",),
    "run_ipython": ("code",),
    "edit": ("path", "command", "file_text", "old_str", "new_str", "content"),
    "write": ("path", "content"),
    "read": ("path",),
    "browse": ("url",),
    "browse_interactive": ("browser_actions",),
    "call_tool_mcp": ("name", "arguments"),
}
_NOT_CONTENT = frozenset(
    {"thought", "confirmation_state", "security_risk", "hidden", "blocking", "is_input"}
)


def proposed_action(event_id: int, payload: JsonObject) -> PendingAction | None:
    """The pending action an agent's action event proposes, or None when it awaits no
    confirmation."""
    args = payload.get("args")
    if not isinstance(args, dict) or args.get("confirmation_state") != "awaiting_confirmation":
        return None
    action = str(payload.get("action", ""))
    return PendingAction(
        event_id=event_id,
        action=action,
        content=_content(action, args),
        security_risk=security_risk(args.get("security_risk")),
        thought=str(args.get("thought") or ""),
    )


def security_risk(value: Any) -> SecurityRisk | None:
    """OpenHands' risk (an integer, or its name in some versions) as a SecurityRisk."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float) and int(value) == value:
        return _RISKS.get(int(value), SecurityRisk.UNKNOWN)
    try:
        return SecurityRisk(str(value).lower())
    except ValueError:
        return SecurityRisk.UNKNOWN


def _content(action: str, args: JsonObject) -> str:
    keys = _CONTENT_ARGS.get(action)
    if keys is None:
        keys = tuple(k for k in args if k not in _NOT_CONTENT)
    parts = []
    for key in keys:
        value = args.get(key)
        if value in (None, ""):
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        parts.append(text if len(keys) == 1 else f"{key}: {text}")
    return "\n".join(parts)


def decision_event(decision: ApprovalDecision) -> JsonObject:
    """The user event a decision writes: what OpenHands' browser sends for it."""
    return {
        "action": "change_agent_state",
        "args": {"agent_state": _DECIDED_STATE[decision], "thought": ""},
    }


def decision_answered(state: str) -> bool:
    """Whether a state the agent reports answers a decision: it no longer waits for one."""
    return state != AWAITING_CONFIRMATION
