"""Who is calling, what they may do, and the audit log of what they did.

Every ConversationService call is made with the service token (trusted: the web tier), with
a scoped token (a browser or another service acting for one user), or, on a server without
authentication, anonymously (trusted). A scoped call is bound to its token before it reaches
the engine: its ``user_id`` becomes the token's user, and what it names must lie within the
token's conversations and permissions.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import structlog

from convsvc.domain import AuditEntry
from convsvc.errors import ConvsvcError, PermissionDenied, Unauthenticated
from convsvc.storage import ConversationStore, StorageError
from convsvc.transport.credentials import StreamCredentials
from convsvc.transport.status import RelayedStatus, failure_parts
from convsvc.transport.tokens import Permission, TokenAuthority, TokenScope

log = structlog.get_logger(__name__)

PERMISSION_OF: dict[str, Permission] = {
    "GetConversation": Permission.READ,
    "ListConversations": Permission.READ,
    "SearchConversations": Permission.READ,
    "ListConnections": Permission.READ,
    "SearchEvents": Permission.READ,
    "StreamEvents": Permission.READ,
    "WatchConversations": Permission.READ,
    "SendEvent": Permission.WRITE,
    "ControlAgent": Permission.WRITE,
    "ConfirmAction": Permission.WRITE,
    "UpdateConversation": Permission.WRITE,
    "Connect": Permission.WRITE,
    "JoinConversation": Permission.WRITE,
    "DisconnectConnection": Permission.WRITE,
    "StartConversation": Permission.ADMIN,
    "ForkConversation": Permission.ADMIN,
    "CloseConversation": Permission.ADMIN,
}
"""What a scoped token needs for each method; the others need the service token."""

MUTATIONS = frozenset(
    {
        "StartConversation",
        "ForkConversation",
        "JoinConversation",
        "SendEvent",
        "ControlAgent",
        "ConfirmAction",
        "UpdateConversation",
        "DisconnectConnection",
        "CloseConversation",
        "MintToken",
        "RevokeToken",
        "CreateWebhook",
        "DeleteWebhook",
    }
)


@dataclass(frozen=True, slots=True)
class Caller:
    credential: str
    """"service", "token", "anonymous" or "unauthenticated"."""
    scope: TokenScope | None = None
    """The token's scope; None for a trusted caller."""


FORWARDED = "x-convsvc-forwarded"
"""Set on a call one node makes to another: it is answered (and audited) where it lands."""

ANONYMOUS = Caller("anonymous")
UNIDENTIFIED = Caller("unauthenticated")
"""A caller whose credentials were refused (what its call is audited as)."""
SERVICE = Caller("service")
current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "convsvc_caller", default=ANONYMOUS
)
"""The caller of the call being handled (set by the handler table for its task)."""


def caller_scope() -> frozenset[str] | None:
    """The conversations the current call may affect: a scoped token's, or None for a
    trusted caller or a token that covers all of its user's conversations."""
    scope = current_caller.get().scope
    return scope.conversation_ids if scope is not None and scope.conversation_ids else None


def forwarded(context: grpc.aio.ServicerContext) -> bool:
    return any(key == FORWARDED for key, _ in context.invocation_metadata() or ())


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, credentials = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
            return None
    return None


def _scope_denied(message: str) -> PermissionDenied:
    return PermissionDenied(message, reason="TOKEN_SCOPE")


class Access:
    """Identifies callers and binds scoped calls to their tokens."""

    def __init__(
        self,
        service_token: str | None,
        authority: TokenAuthority | None,
        store: ConversationStore,
        conversation_of_connection: Callable[[str], str | None],
    ) -> None:
        self._service_token = service_token.encode() if service_token else None
        self.authority = authority
        self._store = store
        self._conversation_of_connection = conversation_of_connection
        self.streams = StreamCredentials()
        """The scoped tokens open streams hold: revocation and expiry end them."""

    async def revoke(self, token_id: str) -> None:
        """Revokes a token (its record outlives any token this server could have minted)
        and ends the streams it opened here (the cluster tells the other nodes)."""
        max_ttl = self.authority.max_ttl_seconds if self.authority is not None else 0
        await self._store.revoke_token(token_id, datetime.now(UTC) + timedelta(seconds=max_ttl))
        self.streams.revoked(token_id)

    async def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        presented = bearer_token(context)
        if presented is None:
            if self._service_token is None:
                return ANONYMOUS
            raise Unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <token>'",
                reason="UNAUTHENTICATED",
            )
        if self._service_token is not None and hmac.compare_digest(
            presented.encode(), self._service_token
        ):
            return SERVICE
        if self.authority is None:
            if self._service_token is None:
                return ANONYMOUS  # no authentication on this server: credentials are ignored
            raise Unauthenticated("wrong credentials", reason="UNAUTHENTICATED")
        scope = self.authority.verify(presented)
        if await self._store.token_revoked(scope.token_id):
            raise Unauthenticated("the token was revoked", reason="TOKEN_REVOKED")
        return Caller("token", scope)

    def authorize(self, method: str, request: Any, caller: Caller) -> None:
        """Raises PermissionDenied (TOKEN_SCOPE) unless ``caller`` may make this call; binds
        a scoped call's user (and conversation filters) to its token."""
        scope = caller.scope
        if scope is None:
            return
        needed = PERMISSION_OF.get(method)
        if needed is None:
            raise _scope_denied(f"{method} needs the service token, not a scoped token")
        if needed not in scope.permissions:
            raise _scope_denied(f"the token does not allow {needed.value} ({method})")
        if request is None:
            return  # a stream's requests are checked as they come (Connect's open)
        fields = request.DESCRIPTOR.fields_by_name
        if "user_id" in fields:
            if request.user_id and request.user_id != scope.user_id:
                raise _scope_denied("the token acts for another user")
            request.user_id = scope.user_id
        if "conversation_ids" in fields and scope.conversation_ids:
            named = set(request.conversation_ids)
            if not named:
                request.conversation_ids.extend(sorted(scope.conversation_ids))
            elif not named <= scope.conversation_ids:
                raise _scope_denied("the token does not cover every conversation named")
        self._check_conversation(method, request, scope)

    def _check_conversation(self, method: str, request: Any, scope: TokenScope) -> None:
        fields = request.DESCRIPTOR.fields_by_name
        if not scope.conversation_ids:
            return  # all of the user's conversations: the engine keeps users apart
        source = request.source_conversation_id if "source_conversation_id" in fields else ""
        if source and not scope.allows_conversation(source):
            raise _scope_denied(f"the token does not cover conversation {source!r}")
        cid = request.conversation_id if "conversation_id" in fields else ""
        connection_id = request.connection_id if "connection_id" in fields else ""
        if method in ("JoinConversation", "Connect") or (cid and not connection_id):
            if not scope.allows_conversation(cid):
                raise _scope_denied(f"the token does not cover conversation {cid!r}")
            return
        if connection_id:
            owner = self._conversation_of_connection(connection_id)
            if owner is None or not scope.allows_conversation(owner):
                raise _scope_denied(
                    "the token covers some conversations only: address one by conversation_id "
                    "(or through Connect)"
                )
            return
        if "conversation_id" in fields:
            raise _scope_denied("the token covers some conversations only: name one")


class Auditor:
    """Records every mutation in the store (it survives restarts) and, when asked, as a log
    record too (one per call, sends included: off by default)."""

    def __init__(self, store: ConversationStore, *, log_records: bool = False) -> None:
        self._store = store
        self._log_records = log_records

    def record(
        self,
        method: str,
        request: Any,
        caller: Caller,
        error: ConvsvcError | RelayedStatus | None,
        response: Any = None,
    ) -> None:
        code, reason = ("OK", "") if error is None else failure_parts(error)[:2]
        scope = caller.scope
        entry = AuditEntry(
            time=datetime.now(UTC),
            credential=caller.credential,
            subject=scope.user_id if scope else "",
            token_id=scope.token_id if scope else "",
            method=method,
            user_id=_field(request, "user_id"),
            conversation_id=_field(request, "conversation_id") or _answered_conversation(response),
            connection_id=_field(request, "connection_id"),
            request_id=_field(request, "request_id"),
            code=code,
            reason=reason,
            affected_token_id=_field(request, "token_id") or _field(response, "token_id"),
        )
        if self._log_records:
            log.info("audit", **{k: v for k, v in _fields(entry).items() if v})
        try:
            self._store.record_audit(entry)
        except StorageError as exc:
            log.error("audit.not_stored", method=method, error=str(exc))


def _fields(entry: AuditEntry) -> dict[str, Any]:
    return {
        "method": entry.method,
        "code": entry.code,
        "reason": entry.reason,
        "credential": entry.credential,
        "subject": entry.subject,
        "token_id": entry.token_id,
        "user_id": entry.user_id,
        "conversation_id": entry.conversation_id,
        "connection_id": entry.connection_id,
        "request_id": entry.request_id,
        "affected_token_id": entry.affected_token_id,
    }


def _field(message: Any, name: str) -> str:
    if message is None or isinstance(message, bytes):
        return ""
    if name not in message.DESCRIPTOR.fields_by_name:
        return ""
    return str(getattr(message, name))


def _answered_conversation(response: Any) -> str:
    """The conversation an answer names (a send by connection, a start without an id)."""
    if response is None or isinstance(response, bytes):
        return ""
    fields = response.DESCRIPTOR.fields_by_name
    if "conversation_id" in fields:
        return str(response.conversation_id)
    if "conversation" in fields:
        return str(response.conversation.conversation_id)
    return ""
