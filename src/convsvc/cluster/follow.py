"""Live events of conversations that run on another node, for this node's streams.

While this node has stream subscribers of a conversation it does not run, one follower task
streams that conversation's live events from its owner and publishes them to the local
subscribers (one internal stream per conversation per node, however many subscribers). When
the owner changes (takeover, drain, close), the old owner ends the internal stream with
OWNER_MOVED and the follower resumes from the next id on the new owner. Subscribers skip ids
they already have and fill any gap from the shared log, so each event reaches them once, in
order, with no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog

from convclient.structs import struct_to_dict
from convsvc.cluster.node import ClusterNode
from convsvc.cluster.routing import FOLLOW, Router
from convsvc.codec import status_update
from convsvc.domain import StoredEvent
from convsvc.engine import ConversationEngine
from convsvc.engine.subscriptions import StreamItem
from convsvc.storage import StorageError
from convsvc.storage.postgres import PostgresStore
from convsvc.v1 import conversation_service_pb2 as pb

log = structlog.get_logger(__name__)

_RETRY_SECONDS = 0.2
"""Pause before asking again who runs a conversation (none yet, or the owner is moving)."""


@dataclass
class _Follower:
    task: asyncio.Task[None] | None = None
    subscribers: int = 0
    next_id: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)


class Followers:
    """One follower per conversation with local subscribers that runs elsewhere."""

    def __init__(
        self, node: ClusterNode, store: PostgresStore, engine: ConversationEngine, router: Router
    ) -> None:
        self._node = node
        self._store = store
        self._engine = engine
        self._router = router
        self._followers: dict[str, _Follower] = {}

    @property
    def count(self) -> int:
        """Conversations followed from their owner now."""
        return len(self._followers)

    @contextlib.asynccontextmanager
    async def following(self, conversation_id: str) -> AsyncIterator[None]:
        """Keeps a follower running for as long as the block runs (a stream's life)."""
        follower = self._followers.get(conversation_id)
        if follower is None:
            follower = _Follower()
            self._followers[conversation_id] = follower
            follower.task = asyncio.create_task(
                self._follow(conversation_id, follower), name=f"follow:{conversation_id}"
            )
        follower.subscribers += 1
        try:
            # The follower's first id is read before the subscriber reads the log, so
            # whatever it publishes later continues what the subscriber read (or is skipped).
            await follower.started.wait()
            yield
        finally:
            follower.subscribers -= 1
            if follower.subscribers == 0 and self._followers.get(conversation_id) is follower:
                del self._followers[conversation_id]
                assert follower.task is not None
                follower.task.cancel()
                # Awaited so that it has ended with its last subscriber (a new stream of the
                # conversation starts a follower of its own).
                await asyncio.gather(follower.task, return_exceptions=True)

    async def stop(self) -> None:
        tasks = [f.task for f in self._followers.values() if f.task is not None]
        self._followers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, cid: str, follower: _Follower) -> None:
        while True:
            try:
                follower.next_id = await self._store.latest_event_id(cid) + 1
                break
            except StorageError:
                await asyncio.sleep(_RETRY_SECONDS)
        follower.started.set()
        while True:
            latest_here = await self._engine.queries.while_here(cid)
            if latest_here is not None:
                # The loop ran here (its events reached subscribers directly) and has left.
                follower.next_id = max(follower.next_id, latest_here + 1)
                continue
            try:
                owner = await self._store.owner_of(cid)
            except StorageError:
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            if (
                owner is None
                or not owner.alive
                or owner.address is None
                or owner.node_id == self._node.node_id
            ):
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            try:
                await self._relay(cid, owner.address, follower)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    log.warning("cluster.follow_failed", conversation_id=cid, code=exc.code().name)
            except Exception:
                # A follower must outlive any one failure: its subscribers wait on it.
                log.exception("cluster.follow_failed", conversation_id=cid)
            await asyncio.sleep(_RETRY_SECONDS)

    async def _relay(self, cid: str, address: str, follower: _Follower) -> None:
        call = self._router.channel(address).unary_stream(
            f"/{pb.DESCRIPTOR.services_by_name['ConversationService'].full_name}/StreamEvents",
            request_serializer=pb.StreamEventsRequest.SerializeToString,
            response_deserializer=pb.StreamEventsResponse.FromString,
        )
        stream = call(
            pb.StreamEventsRequest(conversation_id=cid, start_id=follower.next_id),
            metadata=self._router.metadata((FOLLOW, "1")),
        )
        async for response in stream:
            items: list[StreamItem] = []
            for event in response.events:
                if event.id >= follower.next_id:
                    items.append(StoredEvent(event.id, event.SerializeToString()))
                    follower.next_id = event.id + 1
            if response.HasField("status_update"):
                items.append(status_update(struct_to_dict(response.status_update)))
            if items:
                self._engine.history.publish_followed(cid, items)
