"""Keeps secrets in settings out of storage and logs.

OpenHands settings carry LLM keys and tokens. The running loop gets them in memory; what is
stored or logged has them replaced by a marker, so restart needs the caller to send settings
again (OpenHands does, on every start and join).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "**********"
_SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|credential|private_?key)", re.I)


def is_secret_key(key: str) -> bool:
    """Whether a settings key names a secret (e.g. llm_api_key, github_token)."""
    return bool(_SECRET_KEY.search(key))


def redact(value: Any) -> Any:
    """Returns a copy of a JSON value with every secret-named field's value replaced."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
