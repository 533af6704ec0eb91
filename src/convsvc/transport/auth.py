"""Optional bearer-token authentication for every RPC but health and reflection: the service
token, or for ConversationService a scoped token (checked further by ``transport.access``)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from convsvc.errors import Unauthenticated
from convsvc.transport.status import to_grpc_status

# Operators and load balancers must reach these without credentials.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


SCOPED_SERVICE = "/convsvc.v1.ConversationService/"
"""The service that scoped tokens (transport.tokens) may call; every other needs the token."""


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits calls whose ``authorization`` metadata is ``Bearer <token>`` (the scheme in any
    case, as RFC 7235 has it)."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()
        status = to_grpc_status(
            Unauthenticated(
                "missing or wrong credentials: send metadata 'authorization: Bearer <token>'",
                reason="UNAUTHENTICATED",
            )
        )

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort_with_status(status)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(status)
            yield  # makes this an async generator, as a streaming handler must be

        async def deny_bidi(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(status)
            yield

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny_unary)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)
        self._deny_bidi = grpc.stream_stream_rpc_method_handler(deny_bidi)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                raw = value.encode() if isinstance(value, str) else value
                scheme, _, credentials = raw.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = credentials.strip()
                break
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        if method.startswith(SCOPED_SERVICE) and presented.count(b".") == 2:
            # A JWT: a scoped token, verified and bound to its scope by the handler table.
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is not None and handler.unary_stream is not None:
            return self._deny_stream
        if handler is not None and handler.stream_stream is not None:
            return self._deny_bidi
        return self._deny_unary
