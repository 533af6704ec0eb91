"""Scoped tokens held by long-lived streams (StreamEvents, WatchConversations, Connect).

A unary call checks its token once; a stream lives for hours. So a stream that a scoped
token opened holds the token: when the token expires the stream ends (TOKEN_EXPIRED), and
when it is revoked, here or on any node of the cluster, the stream is told at once and ends
(TOKEN_REVOKED). Nothing it would have sent after that is sent, and no request it would
have read after that is served.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from convsvc.errors import Unauthenticated
from convsvc.transport.tokens import TokenScope

T = TypeVar("T")


def expired() -> Unauthenticated:
    return Unauthenticated(
        "the token of this stream has expired; open it again with a new token",
        reason="TOKEN_EXPIRED",
    )


def revoked() -> Unauthenticated:
    return Unauthenticated("the token of this stream was revoked", reason="TOKEN_REVOKED")


@dataclass(eq=False)
class HeldToken:
    """One stream's hold on its token; ``ended`` completes with why the stream must end."""

    token_id: str
    ended: asyncio.Future[Unauthenticated] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    timer: asyncio.TimerHandle | None = None

    def end(self, error: Unauthenticated) -> None:
        if not self.ended.done():
            self.ended.set_result(error)


class StreamCredentials:
    """The scoped tokens this node's open streams hold, by token id."""

    def __init__(self) -> None:
        self._held: dict[str, set[HeldToken]] = {}

    @contextlib.contextmanager
    def hold(self, scope: TokenScope | None) -> Iterator[HeldToken | None]:
        """Holds a scoped token for the life of the block (None: a trusted caller, whose
        credential is not revocable)."""
        if scope is None:
            yield None
            return
        held = HeldToken(scope.token_id)
        left = (scope.expire_time - datetime.now(UTC)).total_seconds()
        held.timer = asyncio.get_running_loop().call_later(max(left, 0.0), held.end, expired())
        self._held.setdefault(scope.token_id, set()).add(held)
        try:
            yield held
        finally:
            held.timer.cancel()
            holders = self._held.get(scope.token_id)
            if holders is not None:
                holders.discard(held)
                if not holders:
                    del self._held[scope.token_id]

    def revoked(self, token_id: str) -> None:
        """Ends every stream holding ``token_id`` (revoked here, or told by the cluster)."""
        for held in list(self._held.get(token_id, ())):
            held.end(revoked())

    def token_ids(self) -> set[str]:
        """Tokens held by open streams (the cluster rechecks them after missing news)."""
        return set(self._held)


async def until_ended(held: HeldToken | None, responses: AsyncIterator[T]) -> AsyncIterator[T]:
    """The responses, until the held token ends: then the stream ends with why."""
    if held is None:
        async for response in responses:
            yield response
        return
    try:
        while True:
            if held.ended.done():
                raise held.ended.result()
            step: asyncio.Future[tuple[bool, T | None]] = asyncio.ensure_future(_next(responses))
            ended: asyncio.Future[Any] = held.ended
            await asyncio.wait({step, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
                raise held.ended.result()
            more, item = step.result()
            if not more:
                return
            yield cast(T, item)
    finally:
        closing = getattr(responses, "aclose", None)
        if closing is not None:
            await closing()


async def _next(responses: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await anext(responses)
    except StopAsyncIteration:
        return False, None
