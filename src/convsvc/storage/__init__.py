"""Durable storage of conversations and their event logs, behind one interface."""

from convsvc.storage.base import CommitListener, ConversationStore, StorageError

__all__ = ["CommitListener", "ConversationStore", "StorageError"]
