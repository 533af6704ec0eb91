"""WatchConversations across a cluster: every live node's own watch, merged into one.

Each node publishes the changes of the conversations it runs. A cluster watch opens a
node-local watch on every live node (its own engine, and its peers with the forwarding
header), and merges them:
- the opening snapshot is the union of the nodes' snapshots, sent once all have arrived;
- a resume token holds each node's own token, so a watcher resumes through any node;
- a node that cannot resume makes the whole watch start over with a snapshot (allowed at
  any time: a snapshot replaces what the watcher knew);
- when a conversation moves between nodes, the old owner's CLOSED may arrive after the new
  owner's news: a change from a node that no longer owns the conversation is dropped;
- the watch ends with UNAVAILABLE when a node goes away or joins (the watcher resumes, and
  the new set of nodes is watched).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from convsvc import validation
from convsvc.engine import ConversationEngine
from convsvc.errors import ConvsvcError, FailedPrecondition, InvalidArgument, Unavailable
from convsvc.storage.postgres_directory import PostgresDirectory
from convsvc.transport.convert import SNAPSHOT_PAGE, watch_update_to_pb
from convsvc.v1 import conversation_service_pb2 as pb

RESUME_ONLY = "x-convsvc-watch-resume-only"
"""On a node-local watch: answer FAILED_PRECONDITION rather than a snapshot when the token
cannot be resumed (the cluster watch then starts over with snapshots from every node)."""
_TOKEN_PREFIX = "cluster."
_CLOSED = pb.CONVERSATION_CHANGE_KIND_CLOSED
_QUEUE = 256


class _StartOver(Exception):
    """A node could not resume: every node must send a snapshot."""


def encode_tokens(tokens: dict[str, str]) -> str:
    raw = json.dumps(tokens, sort_keys=True, separators=(",", ":")).encode()
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode()


def decode_tokens(token: str) -> dict[str, str]:
    invalid = InvalidArgument(
        "resume_token is not a token this cluster handed out",
        reason="INVALID_RESUME_TOKEN",
        metadata={"field": "resume_token"},
    )
    if not token.startswith(_TOKEN_PREFIX) or len(token) > 64 * 1024:
        raise invalid
    try:
        tokens = json.loads(base64.urlsafe_b64decode(token[len(_TOKEN_PREFIX) :]))
    except (binascii.Error, ValueError):
        raise invalid from None
    if not isinstance(tokens, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()
    ):
        raise invalid
    return tokens


NodeStream = Callable[
    [str, pb.WatchConversationsRequest, bool], AsyncIterator[pb.WatchConversationsResponse]
]
"""(address, request, resume only) -> that peer's node-local watch."""


class ClusterWatch:
    def __init__(
        self,
        directory: PostgresDirectory,
        engine: ConversationEngine,
        peer_stream: NodeStream,
        recheck_seconds: float,
    ) -> None:
        self._directory = directory
        self._engine = engine
        self._peer_stream = peer_stream
        self._recheck = recheck_seconds

    def local(
        self, request: pb.WatchConversationsRequest, resume_only: bool
    ) -> AsyncIterator[pb.WatchConversationsResponse]:
        """This node's own watch (what a peer's cluster watch reads)."""

        async def responses() -> AsyncIterator[pb.WatchConversationsResponse]:
            updates = self._engine.queries.watch_conversations(
                user_id=request.user_id,
                conversation_ids=list(request.conversation_ids),
                resume_token=request.resume_token,
                resume_only=resume_only,
            )
            async for update in updates:
                for response in watch_update_to_pb(update):
                    yield response

        return responses()

    async def watch(
        self, request: pb.WatchConversationsRequest
    ) -> AsyncIterator[pb.WatchConversationsResponse]:
        tokens = decode_tokens(request.resume_token) if request.resume_token else {}
        # Checked here, as a single node would: a peer's refusal would arrive as its status.
        validation.check_user_id(request.user_id)
        for cid in request.conversation_ids:
            validation.check_id("conversation_ids", cid)
        while True:
            nodes = await self._directory.live_nodes()
            resume = bool(tokens) and {node_id for node_id, _ in nodes} <= tokens.keys()
            try:
                async for response in self._merged(request, nodes, tokens if resume else {}):
                    yield response
            except _StartOver:
                tokens = {}
                continue
            return

    async def _merged(
        self,
        request: pb.WatchConversationsRequest,
        nodes: list[tuple[str, str]],
        tokens: dict[str, str],
    ) -> AsyncIterator[pb.WatchConversationsResponse]:
        resume = bool(tokens)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(_QUEUE)
        here = self._directory.node_id

        async def pump(node_id: str, address: str) -> None:
            node_request = pb.WatchConversationsRequest(
                user_id=request.user_id,
                conversation_ids=request.conversation_ids,
                resume_token=tokens.get(node_id, ""),
            )
            try:
                if node_id == here:
                    stream = self.local(node_request, resume)
                else:
                    stream = self._peer_stream(address, node_request, resume)
                async for response in stream:
                    await queue.put((node_id, response))
                ended = Unavailable("a node ended its watch", reason="WATCH_NODE_LEFT")
                await queue.put((node_id, ended))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the merged watch ends with it (or starts over)
                await queue.put((node_id, exc))

        async def recheck() -> None:
            expected = {node_id for node_id, _ in nodes}
            while True:
                await asyncio.sleep(self._recheck)  # membership has no change feed to wait on
                if {node_id for node_id, _ in await self._directory.live_nodes()} != expected:
                    await queue.put(
                        (
                            "",
                            Unavailable(
                                "the cluster's nodes changed; resume the watch with the last "
                                "resume_token",
                                reason="WATCH_TOPOLOGY_CHANGED",
                            ),
                        )
                    )
                    return

        tasks = [asyncio.create_task(pump(node_id, address)) for node_id, address in nodes]
        tasks.append(asyncio.create_task(recheck()))
        owners: dict[str, str] = {}
        current = {node_id: tokens[node_id] for node_id, _ in nodes if node_id in tokens}
        try:
            pending_snapshots = {node_id for node_id, _ in nodes} if not resume else set()
            snapshot: list[pb.WatchedConversation] = []
            held: list[pb.ConversationChange] = []
            while True:
                node_id, item = await queue.get()
                if isinstance(item, BaseException):
                    raise _failure(item)
                if item.snapshot or item.snapshot_complete:
                    if resume:
                        raise _StartOver()  # (a node-local resume-only watch never does this)
                    for watched in item.snapshot:
                        owners[watched.conversation.conversation_id] = node_id
                        snapshot.append(watched)
                    if item.snapshot_complete:
                        current[node_id] = item.resume_token
                        pending_snapshots.discard(node_id)
                        if not pending_snapshots:
                            snapshot.sort(key=lambda w: w.conversation.conversation_id)
                            for response in _snapshot_pages(snapshot, encode_tokens(current)):
                                yield response
                            if held:
                                yield pb.WatchConversationsResponse(
                                    changes=held, resume_token=encode_tokens(current)
                                )
                            snapshot, held = [], []
                    continue
                changes = [c for c in item.changes if _from_owner(owners, node_id, c)]
                current[node_id] = item.resume_token
                if pending_snapshots:
                    held += changes
                elif changes:
                    yield pb.WatchConversationsResponse(
                        changes=changes, resume_token=encode_tokens(current)
                    )
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)


def _from_owner(owners: dict[str, str], node_id: str, change: pb.ConversationChange) -> bool:
    """Whether a change is news: it comes from the node that runs the conversation now."""
    cid = change.watched.conversation.conversation_id
    if change.kind == _CLOSED:
        if owners.get(cid, node_id) != node_id:
            return False  # an old owner's close, behind the new owner's start
        owners.pop(cid, None)
        return True
    owners[cid] = node_id
    return True


def _snapshot_pages(
    snapshot: list[pb.WatchedConversation], token: str
) -> list[pb.WatchConversationsResponse]:
    pages = [
        snapshot[start : start + SNAPSHOT_PAGE] for start in range(0, len(snapshot), SNAPSHOT_PAGE)
    ] or [[]]
    responses = [pb.WatchConversationsResponse(snapshot=page) for page in pages]
    responses[-1].snapshot_complete = True
    responses[-1].resume_token = token
    return responses


def _failure(error: BaseException) -> Exception:
    if isinstance(error, FailedPrecondition) and error.reason == "RESUME_TOKEN_EXPIRED":
        return _StartOver()
    if isinstance(error, grpc.aio.AioRpcError):
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return _StartOver()
        return Unavailable(
            f"a node of the cluster stopped answering the watch ({error.code().name}); resume "
            "with the last resume_token",
            reason="WATCH_NODE_LEFT",
        )
    if isinstance(error, ConvsvcError):
        return error
    return Unavailable("a node of the cluster ended the watch", reason="WATCH_NODE_LEFT")
