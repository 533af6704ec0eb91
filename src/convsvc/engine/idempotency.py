"""Request ids (AIP-155): a retried mutation returns the first call's answer.

One call per (user, request id) runs at a time. A retry that arrives while the first call is
still running waits for it and then reads the recorded answer; if the first call failed,
nothing was recorded and the retry runs as a call of its own. Whatever happens to a call
(an error, a conflict, the client cancelling), its slot is released, so no later call with
the same id can hang.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from convsvc import validation
from convsvc.domain import IdempotencyRecord, JsonObject
from convsvc.errors import AlreadyExists
from convsvc.storage import ConversationStore
from convsvc.storage.base import Durability


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
    """One call under a request id, as the ledger sees it (an async context manager: see
    ``RequestLedger.call``; without a request id it does nothing)."""

    __slots__ = ("_ledger", "answer", "effect", "finished", "key", "recorded", "stored")

    def __init__(self, key: RequestKey | None, ledger: RequestLedger) -> None:
        self.key = key
        self._ledger = ledger
        self.recorded: JsonObject | None = None
        """The answer an earlier call with this request id recorded: answer with it, do
        nothing else."""
        self.answer: JsonObject | None = None
        self.stored = False
        self.finished: asyncio.Event | None = None
        self.effect: Durability | None = None
        """The commit that makes the call's effect (and its record) durable, once queued."""

    def committing(self, effect: Durability) -> Durability:
        """Registers the commit of the call's effect: if the caller leaves before it is
        known (its deadline, a cancel), the request id stays taken until it is, so that a
        retry reads the recorded answer rather than making the effect a second time."""
        self.effect = effect
        return effect

    def answered(self, result: JsonObject, *, stored: bool) -> None:
        """The call's answer; ``stored``: its record was written atomically with its effect
        (``key.record(result)``), else the ledger writes it once the call is done."""
        self.answer = result
        self.stored = stored

    async def __aenter__(self) -> LedgerCall:
        if self.key is not None:
            await self._ledger._enter(self)
        return self

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if self.key is not None:
            await self._ledger._exit(self, failed=exc is not None)


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

    def call(self, key: RequestKey | None) -> LedgerCall:
        """``async with ledger.call(key) as call``: the block makes the call once. It finds
        ``recorded`` set when an earlier call answered, else it reports its answer with
        ``answered``. A block that raises records nothing."""
        return LedgerCall(key, self)

    async def _enter(self, call: LedgerCall) -> None:
        key = call.key
        assert key is not None
        slot = (key.scope, key.request_id)
        while (running := self._running.get(slot)) is not None:
            await running.wait()  # its outcome is read from the store below, not shared
        finished = asyncio.Event()
        self._running[slot] = finished
        try:
            record = await self._store.get_idempotency(key.scope, key.request_id)
        except BaseException:
            self._release(slot, finished)
            raise
        call.finished = finished
        if record is not None:
            try:
                _check_same_request(key, record)
            except BaseException:
                self._release(slot, finished)
                raise
            call.recorded = record.result

    async def _exit(self, call: LedgerCall, failed: bool) -> None:
        key, finished = call.key, call.finished
        assert key is not None and finished is not None
        effect = call.effect
        if failed and effect is not None and not effect.settled.done():
            # The caller left while its effect was being committed: it may still land.
            slot = (key.scope, key.request_id)
            effect.settled.add_done_callback(lambda _: self._release(slot, finished))
            return
        try:
            if not failed and call.answer is not None and not call.stored:
                # Shielded: once the effect has happened its answer must be recorded, even if
                # the caller gives up meanwhile (the store's writer owns the write).
                await asyncio.shield(self._store.submit_idempotency(key.record(call.answer)))
        finally:
            self._release((key.scope, key.request_id), finished)

    def _release(self, slot: tuple[str, str], finished: asyncio.Event) -> None:
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
