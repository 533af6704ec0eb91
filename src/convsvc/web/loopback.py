"""An HTTP front door's way into convsvc: its own node's gRPC service, called with the
caller's credential as the bearer token. Everything a gRPC client meets applies unchanged (the
service token and scoped tokens, per-user limits, admission policies, audit, forwarding to
the owner in a cluster); convsvc's errors become HTTP answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from convclient import convert
from convclient.errors import ConvsvcClientError, from_rpc_error
from convclient.models import Conversation, Event, EventBatch
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

_TIMEOUT_SECONDS = 30.0

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


@dataclass
class ApiError(Exception):
    """An HTTP answer other than success: status, a detail a person understands, and
    convsvc's stable reason when convsvc gave one."""

    status: int
    detail: str
    reason: str = ""

    @classmethod
    def of(cls, error: ConvsvcClientError) -> ApiError:
        return cls(_HTTP_STATUS.get(error.code, 500), error.message, error.reason)


class Backend:
    """Calls convsvc at ``address`` (this node) for HTTP requests."""

    def __init__(self, address: str, max_message_bytes: int) -> None:
        self.address = address
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = pb_grpc.ConversationServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def call(self, method: str, request: Any, key: str | None) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, timeout=_TIMEOUT_SECONDS, metadata=_metadata(key)
            )
        except grpc.RpcError as exc:
            raise ApiError.of(
                from_rpc_error(exc, address=self.address, timeout=_TIMEOUT_SECONDS)
            ) from None

    async def conversation(self, conversation_id: str, key: str | None) -> Conversation:
        response = await self.call(
            "GetConversation", pb.GetConversationRequest(conversation_id=conversation_id), key
        )
        return convert.conversation(response.conversation)

    async def events(
        self, conversation_id: str, key: str | None, *, start_id: int = 0, reverse: bool = False
    ) -> AsyncIterator[Event]:
        """The conversation's logged events from ``start_id`` (newest first when ``reverse``),
        page by page."""
        token = ""
        while True:
            request = pb.SearchEventsRequest(
                conversation_id=conversation_id,
                start_id=0 if reverse else start_id,
                reverse=reverse,
                page_size=1000,
                page_token=token,
            )
            response = await self.call("SearchEvents", request, key)
            for message in response.events:
                yield convert.event(message)
            token = response.next_page_token
            if not token:
                return

    async def stream(
        self, conversation_id: str, key: str | None, start_id: int
    ) -> AsyncIterator[EventBatch]:
        """Stored-then-live events from ``start_id`` and live status updates, until the
        caller stops reading or convsvc ends the stream."""
        call = self._stub.StreamEvents(
            pb.StreamEventsRequest(conversation_id=conversation_id, start_id=start_id),
            metadata=_metadata(key),
        )
        async for message in self._read(call):
            yield convert.event_batch(message)

    def watch(self, key: str | None) -> AsyncIterator[Any]:
        """WatchConversations' responses (a snapshot, then changes) until the caller stops
        reading or convsvc ends the stream."""
        call = self._stub.WatchConversations(
            pb.WatchConversationsRequest(), metadata=_metadata(key)
        )
        return self._read(call)

    async def _read(self, call: Any) -> AsyncIterator[Any]:
        """A server stream's messages, its failure as an ApiError; cancelled when the reader
        stops."""
        try:
            async for message in call:
                yield message
        except grpc.RpcError as exc:
            raise ApiError.of(
                from_rpc_error(exc, address=self.address, timeout=_TIMEOUT_SECONDS)
            ) from None
        finally:
            call.cancel()


def _metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()
