"""The conversation engine: rules and state, independent of gRPC."""

from convsvc.engine.engine import TOO_MANY_CONVERSATIONS, ConversationEngine

__all__ = ["TOO_MANY_CONVERSATIONS", "ConversationEngine"]
