"""Keeps secrets in settings out of storage and logs.

OpenHands settings carry LLM keys and tokens, and secrets can hide anywhere in them: an MCP
server's environment, a password inside a database URL, a header. No list of secret names can
catch them all, so the store keeps only an allow-list of settings known to be harmless (which
agent, which model, limits and switches) with scalar values. The running loop gets every
setting in memory; a restarted conversation gets its settings again from the caller (OpenHands
sends them on every start and join).
"""

from __future__ import annotations

import re
from typing import Any

STORABLE_SETTINGS = frozenset(
    {
        "agent",
        "language",
        "llm_model",
        "max_iterations",
        "max_budget_per_task",
        "confirmation_mode",
        "security_analyzer",
        "enable_default_condenser",
        "condenser_max_size",
        "enable_sound_notifications",
        "enable_proactive_conversation_starters",
        "remote_runtime_resource_factor",
        "sandbox_base_container_image",
        "sandbox_runtime_container_image",
        "user_version",
        "echo_reply_delay_seconds",
    }
)
"""Settings stored with a conversation; everything else lives in memory only."""
_MAX_STORED_STRING = 256

REDACTED = "**********"
_SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|credential|private_?key)", re.I)


def storable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of ``settings`` that may be written to disk."""
    return {
        key: value
        for key, value in settings.items()
        if key in STORABLE_SETTINGS
        and (
            value is None
            or isinstance(value, bool | int | float)
            or (isinstance(value, str) and len(value) <= _MAX_STORED_STRING and "://" not in value)
        )
    }


def is_secret_key(key: str) -> bool:
    """Whether a key names a secret (e.g. llm_api_key, github_token)."""
    return bool(_SECRET_KEY.search(key))


def redact(value: Any) -> Any:
    """A copy of a JSON value with every secret-named field's value replaced: a second line
    of defence for logs, which never carry settings in the first place."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
