"""convclient: the typed Python client of convsvc (async and blocking), with no OpenHands
dependency. The OpenHands adapter lives in ``convclient.openhands``."""

from convclient.client import AsyncConvsvcClient
from convclient.config import ClientSettings
from convclient.connect import AsyncConnectSession, ConnectSession
from convclient.errors import (
    AlreadyExistsError,
    ConvsvcClientError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    UnauthenticatedError,
)
from convclient.models import (
    AdmissionPolicy,
    AuditEntry,
    ChangeKind,
    Connection,
    Conversation,
    ConversationChange,
    ConversationStatus,
    Event,
    EventBatch,
    HeartbeatResult,
    Page,
    Permission,
    ScopedToken,
    SendResult,
    WatchedConversation,
    WatchUpdate,
)
from convclient.sync_client import ConvsvcClient

__all__ = [
    "AdmissionPolicy",
    "AlreadyExistsError",
    "AsyncConnectSession",
    "AsyncConvsvcClient",
    "AuditEntry",
    "ChangeKind",
    "ClientSettings",
    "ConnectSession",
    "Connection",
    "Conversation",
    "ConversationChange",
    "ConversationStatus",
    "ConvsvcClient",
    "ConvsvcClientError",
    "Event",
    "EventBatch",
    "FailedPreconditionError",
    "HeartbeatResult",
    "InvalidArgumentError",
    "NotFoundError",
    "Page",
    "Permission",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ScopedToken",
    "SendResult",
    "ServiceUnavailableError",
    "UnauthenticatedError",
    "WatchUpdate",
    "WatchedConversation",
]
