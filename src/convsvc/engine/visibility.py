"""Users are isolated: a call made for one user sees another user's conversation exactly as
it sees a missing one (NOT_FOUND), so ids leak nothing. A call without a user (the trusted
web tier, an operator) sees every conversation."""

from __future__ import annotations

from convsvc.engine.registry import RuntimeRegistry
from convsvc.engine.runtime import ConversationRuntime
from convsvc.errors import FailedPrecondition, NotFound, PermissionDenied
from convsvc.storage import ConversationStore


def not_found(conversation_id: str) -> NotFound:
    return NotFound(
        f"conversation {conversation_id} does not exist",
        reason="CONVERSATION_NOT_FOUND",
        metadata={"conversation_id": conversation_id},
    )


def check_owner(conversation_id: str, owner: str | None, user: str | None) -> None:
    """Raises NOT_FOUND unless ``user`` (None: trusted) may see a conversation of ``owner``."""
    if user is not None and owner != user:
        raise not_found(conversation_id)


async def check_visible(
    registry: RuntimeRegistry, store: ConversationStore, conversation_id: str, user: str | None
) -> None:
    """Raises NOT_FOUND unless the conversation exists (running or stored) for ``user``."""
    runtime = registry.get(conversation_id)
    record = (
        runtime.record if runtime is not None else await store.get_conversation(conversation_id)
    )
    if record is None:
        raise not_found(conversation_id)
    check_owner(conversation_id, record.user_id, user)


async def running_for(
    registry: RuntimeRegistry, store: ConversationStore, conversation_id: str, user: str | None
) -> ConversationRuntime:
    """The conversation's runtime if it runs and ``user`` may see it; FAILED_PRECONDITION
    when it is visible but not running."""
    runtime = registry.running(conversation_id)
    if runtime is None:
        await check_visible(registry, store, conversation_id, user)
        raise FailedPrecondition(
            f"conversation {conversation_id} is not running; start or join it first",
            reason="CONVERSATION_NOT_RUNNING",
            metadata={"conversation_id": conversation_id},
        )
    check_owner(conversation_id, runtime.record.user_id, user)
    return runtime


Scope = frozenset[str] | None
"""The conversations a call may affect (a scoped token's); None: any of its user's."""


def out_of_scope(scope: Scope, conversation_id: str, why: str) -> None:
    """Raises PERMISSION_DENIED (TOKEN_SCOPE) when ``conversation_id``, which the call would
    affect (``why``), lies outside ``scope``."""
    if scope is not None and conversation_id not in scope:
        raise PermissionDenied(
            f"{why}: conversation {conversation_id}, which the token does not cover",
            reason="TOKEN_SCOPE",
            metadata={"conversation_id": conversation_id},
        )
