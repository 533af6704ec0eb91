"""Request ids (AIP-155): a retried mutation returns the first call's answer.

One call per (user, request id) runs at a time. A retry that arrives while the first call is
still running waits for it and then reads the recorded answer; if the first call failed,
nothing was recorded and the retry runs as a call of its own. Whatever happens to a call
(an error, a conflict, the client cancelling), its slot is released, so no later call with
the same id can hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from convsvc import validation
from convsvc.domain import IdempotencyRecord, JsonObject
from convsvc.errors import AlreadyExists
from convsvc.storage import ConversationStore


@dataclass(slots=True, frozen=True)
class RequestKey:
    """A request id, the method it was used for and a digest of the call's arguments."""

    scope: str
    request_id: str
    method: str
    fingerprint: str

    def record(self, result: JsonObject) -> IdempotencyRecord:
        return IdempotencyRecord(self.scope, self.request_id, self.method, self.fingerprint, result)


class LedgerCall:
    """One call under a request id, as the ledger sees it."""

    __slots__ = ("answer", "key", "recorded", "stored")

    def __init__(self, key: RequestKey | None) -> None:
        self.key = key
        self.recorded: JsonObject | None = None
        """The answer an earlier call with this request id recorded: answer with it, do
        nothing else."""
        self.answer: JsonObject | None = None
        self.stored = False

    def answered(self, result: JsonObject, *, stored: bool) -> None:
        """The call's answer; ``stored``: its record was written atomically with its effect
        (``key.record(result)``), else the ledger writes it once the call is done."""
        self.answer = result
        self.stored = stored


class RequestLedger:
    """Runs each (user, request id) once and answers its retries from the store."""

    def __init__(self, store: ConversationStore) -> None:
        self._store = store
        self._running: dict[tuple[str, str], asyncio.Event] = {}

    @staticmethod
    def key(user: str | None, request_id: str, method: str, args: Any) -> RequestKey | None:
        """The key of a call, or None when it names no request id."""
        if not request_id:
            return None
        validation.check_id("request_id", request_id)
        digest = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode())
        return RequestKey(user or "", request_id, method, digest.hexdigest()[:32])

    @contextlib.asynccontextmanager
    async def call(self, key: RequestKey | None) -> AsyncIterator[LedgerCall]:
        """The block makes the call once: it finds ``recorded`` set when an earlier call
        answered, else it reports its answer with ``answered``. A block that raises records
        nothing."""
        call = LedgerCall(key)
        if key is None:
            yield call
            return
        slot = (key.scope, key.request_id)
        while (running := self._running.get(slot)) is not None:
            await running.wait()  # its outcome is read from the store below, not shared
        finished = asyncio.Event()
        self._running[slot] = finished
        try:
            record = await self._store.get_idempotency(key.scope, key.request_id)
            if record is not None:
                _check_same_request(key, record)
                call.recorded = record.result
            yield call
            if call.answer is not None and not call.stored:
                # Shielded: once the effect has happened its answer must be recorded, even if
                # the caller gives up meanwhile (the store's writer owns the write).
                await asyncio.shield(self._store.submit_idempotency(key.record(call.answer)))
        finally:
            del self._running[slot]
            finished.set()


def _check_same_request(key: RequestKey, record: IdempotencyRecord) -> None:
    if (record.method, record.fingerprint) != (key.method, key.fingerprint):
        raise AlreadyExists(
            f"request_id {key.request_id!r} was already used for a different request; "
            "use a new request_id for a new request",
            reason="REQUEST_ID_CONFLICT",
            metadata={"request_id": key.request_id},
        )
