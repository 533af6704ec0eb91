"""Durable storage of conversations and their event logs, behind one interface."""

from convsvc.storage.base import (
    CommitListener,
    ConversationLogError,
    ConversationStore,
    EventPage,
    LogInterrupted,
    OwnerMoved,
    StorageError,
    StoreUnavailable,
)

__all__ = [
    "CommitListener",
    "ConversationLogError",
    "ConversationStore",
    "EventPage",
    "LogInterrupted",
    "OwnerMoved",
    "StorageError",
    "StoreUnavailable",
]
