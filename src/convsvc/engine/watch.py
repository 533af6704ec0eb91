"""The change feed behind WatchConversations.

The engine publishes a change whenever a conversation appears, changes status or agent
state, gains or loses a connection, moves up the admission queue or stops. Each change gets
the next sequence number and is kept in a bounded history, which every watcher reads with
its own cursor: publishing never waits and costs the same however many watch. A watcher's
resume token names the feed (one per server process) and the last sequence number it saw,
so it can continue after a reconnect while the history still holds what followed.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from convsvc.domain import ConversationView
from convsvc.errors import ConvsvcError, InvalidArgument, ResourceExhausted

MAX_CHANGES_PER_BATCH = 500
_SEQUENCE = re.compile(r"[0-9]{1,19}")  # ASCII digits only (str.isdigit takes '²')


class ChangeKind(enum.StrEnum):
    CREATED = "created"
    STATUS_CHANGED = "status_changed"
    AGENT_STATE_CHANGED = "agent_state_changed"
    CONNECTIONS_CHANGED = "connections_changed"
    QUEUE_POSITION_CHANGED = "queue_position_changed"
    CLOSED = "closed"
    PENDING_ACTION_CHANGED = "pending_action_changed"
    UPDATED = "updated"


@dataclass(slots=True, frozen=True)
class WatchedConversation:
    view: ConversationView
    connection_ids: tuple[str, ...]


@dataclass(slots=True)
class Change:
    seq: int
    kind: ChangeKind
    watched: WatchedConversation
    time: datetime
    wire: bytes | None = field(default=None, compare=False)
    """Its encoding for watchers: made by the first watch stream that sends it and shared by
    every other (see transport.convert), so a change costs one encoding, not one a watcher."""


@dataclass(slots=True, frozen=True)
class WatchUpdate:
    """What a watch stream sends next: a snapshot (which replaces what the watcher knew)
    or changes, and the token to resume after it."""

    snapshot: Sequence[WatchedConversation] | None
    changes: Sequence[Change]
    resume_token: str


Matches = Callable[[WatchedConversation], bool]


class WatcherTooSlow(ResourceExhausted):
    reason = "WATCHER_TOO_SLOW"


class ChangeFeed:
    def __init__(self, history: int, max_lag: int) -> None:
        self._id = uuid.uuid4().hex[:16]
        self._history: deque[Change] = deque(maxlen=history)
        self._max_lag = max_lag
        self._last_seq = 0
        self._wakeup = asyncio.Event()
        """Wakes watchers of every user (trusted ones, or by conversation id)."""
        self._user_wakeups: dict[str | None, asyncio.Event] = {}
        """Wakes watchers of one user, only when that user's conversations change: a change
        costs the watchers who can see it, not every watcher."""
        self._ended: ConvsvcError | None = None
        self.watchers = 0
        """Watches reading the feed now."""

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def publish(self, kind: ChangeKind, watched: WatchedConversation) -> None:
        self._last_seq += 1
        self._history.append(Change(self._last_seq, kind, watched, datetime.now(UTC)))
        self._wakeup.set()
        self._wakeup = asyncio.Event()
        users = self._user_wakeups.pop(watched.view.user_id, None)
        if users is not None:
            users.set()

    def check_open(self) -> None:
        """Raises the error the feed ended with (no new watch starts after shutdown)."""
        if self._ended is not None:
            raise self._ended

    def end(self, error: ConvsvcError) -> None:
        """Ends every watch with ``error`` (the server is shutting down)."""
        self._ended = error
        self._wakeup.set()
        for wakeup in self._user_wakeups.values():
            wakeup.set()

    def token(self, seq: int) -> str:
        return f"{self._id}.{seq}"

    def resumable_seq(self, token: str) -> int | None:
        """The sequence number a token resumes after, or None when this feed cannot resume
        from it (another server process's token, or older than the history)."""
        feed_id, _, seq_text = token.partition(".")
        if len(token) > 64 or not _SEQUENCE.fullmatch(seq_text):
            raise InvalidArgument(
                "resume_token is not a token this service handed out",
                reason="INVALID_RESUME_TOKEN",
                metadata={"field": "resume_token"},
            )
        seq = int(seq_text)
        if feed_id != self._id or seq > self._last_seq or seq < self._oldest_seq() - 1:
            return None
        return seq

    def _oldest_seq(self) -> int:
        return self._history[0].seq if self._history else self._last_seq + 1

    async def changes_after(
        self, seq: int, matches: Matches, *, resumed: bool, user: str | None = None
    ) -> AsyncIterator[WatchUpdate]:
        """Every matching change after ``seq``, in batches, forever (or until ``end``).
        ``user``: the watcher sees only this user's conversations (it is woken for theirs).

        A watcher that comes back for more while more matching changes than the lag allows
        wait for it is dropped: what it missed may be about to leave the history. (One that
        resumed is not held to the lag until it has caught up once.) Changes it cannot see
        do not count: another user's burst costs it nothing.
        """
        caught_up = not resumed
        self.watchers += 1
        try:
            async for update in self._follow(seq, matches, caught_up, user):
                yield update
        finally:
            self.watchers -= 1

    async def _follow(
        self, seq: int, matches: Matches, caught_up: bool, user: str | None
    ) -> AsyncIterator[WatchUpdate]:
        while True:
            if self._ended is not None:
                raise self._ended
            # A watcher catching up after a resume is bound by the history alone.
            if seq < self._oldest_seq() - 1 or (caught_up and self._lags(seq, matches)):
                raise WatcherTooSlow(
                    f"the watch fell more than {self._max_lag} changes behind and was dropped; "
                    "resume with the resume_token in this error's metadata",
                    metadata={"resume_token": self.token(seq)},
                )
            if seq == self._last_seq:
                caught_up = True
                await self._wakeup_for(user).wait()
                continue
            start = seq - self._oldest_seq() + 1
            batch: list[Change] = []
            for change in itertools.islice(self._history, start, None):
                seq = change.seq
                if matches(change.watched):
                    batch.append(change)
                    if len(batch) == MAX_CHANGES_PER_BATCH:
                        break
            if batch:
                yield WatchUpdate(None, batch, self.token(seq))

    def _wakeup_for(self, user: str | None) -> asyncio.Event:
        if user is None:
            return self._wakeup
        return self._user_wakeups.setdefault(user, asyncio.Event())

    def _lags(self, seq: int, matches: Matches) -> bool:
        """Whether more matching changes than the lag allows wait after ``seq`` (counted
        only when that many changes of any kind do)."""
        if self._last_seq - seq <= self._max_lag:
            return False
        start = seq - self._oldest_seq() + 1
        waiting = 0
        for change in itertools.islice(self._history, start, None):
            waiting += matches(change.watched)
            if waiting > self._max_lag:
                return True
        return False
