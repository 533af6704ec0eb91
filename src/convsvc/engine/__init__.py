"""The conversation engine: rules and state, independent of gRPC.

``engine`` owns every change of a running conversation's phase and the commands that cause
them; ``registry`` holds the running conversations, ``log`` appends their events and fans out
what commits, ``admission`` keeps the per-user limit, ``queries`` and ``history`` answer
reads. See the README's "Code layout".
"""

from convsvc.engine.engine import TOO_MANY_CONVERSATIONS, ConversationEngine

__all__ = ["TOO_MANY_CONVERSATIONS", "ConversationEngine"]
