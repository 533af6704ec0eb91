"""WatchConversations responses read into WatchUpdates: snapshot pages gathered into one, and
the token to resume from kept (also the one a WATCHER_TOO_SLOW error carries)."""

from __future__ import annotations

import grpc

from convclient import convert
from convclient.models import WatchedConversation, WatchUpdate
from convsvc.v1 import conversation_service_pb2 as pb


class WatchReader:
    def __init__(self, resume_token: str) -> None:
        self.resume_token = resume_token
        self._snapshot: list[WatchedConversation] | None = None

    def request(self, user_id: str, conversation_ids: list[str]) -> pb.WatchConversationsRequest:
        """The request that continues from where this reader is (a new snapshot is asked
        for when it has no token)."""
        self._snapshot = None  # a snapshot cut short by a failure is asked for again
        return pb.WatchConversationsRequest(
            user_id=user_id, conversation_ids=conversation_ids, resume_token=self.resume_token
        )

    def read(self, response: pb.WatchConversationsResponse) -> WatchUpdate | None:
        """The update a response completes, if any."""
        if response.snapshot or response.snapshot_complete:
            if self._snapshot is None:
                self._snapshot = []
            self._snapshot += [convert.watched(w) for w in response.snapshot]
            if not response.snapshot_complete:
                return None
            snapshot, self._snapshot = self._snapshot, None
            self.resume_token = response.resume_token
            return WatchUpdate(snapshot=snapshot, resume_token=self.resume_token)
        self.resume_token = response.resume_token
        changes = [c for m in response.changes if (c := convert.change(m)) is not None]
        return WatchUpdate(changes=changes, resume_token=self.resume_token)

    def failed(self, error: grpc.RpcError, metadata: dict[str, str]) -> None:
        """A dropped watcher resumes from the token the server names."""
        token = metadata.get("resume_token")
        if token:
            self.resume_token = token
