"""What clients did and saw during a partition test, and the checker that judges it afterwards
against the conversation's stored log (Jepsen's method: record a history, then verify it).

Each send is an operation: invoked (monotonic time), completed, and an outcome: ``ok`` (an
event id was acknowledged), ``fail`` (an error that promises nothing was done) or
``unknown`` (an error after which the send may or may not have been made: UNAVAILABLE,
DEADLINE_EXCEEDED, and any error relayed from a node that stopped answering). A client retries
an ``unknown`` send with the same request id; all attempts are kept. Readers record each
stream they held (from which id, the events they got) until it broke.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

UNKNOWN_OUTCOME = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
"""Codes that say nothing about whether the call took effect."""


@dataclass
class Operation:
    client: str
    text: str
    """The message sent (unique per send; its request id is derived from it)."""
    node: str
    invoked: float
    completed: float = 0.0
    outcome: str = "pending"
    event_id: int | None = None
    code: str = ""
    reason: str = ""
    details: str = ""

    def failed(self, exc: grpc.aio.AioRpcError) -> None:
        self.code = exc.code().name
        self.reason = reason_of(exc)
        self.details = exc.details() or ""
        self.outcome = "unknown" if exc.code() in UNKNOWN_OUTCOME else "fail"


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of an error, if it has one (gRPC's own errors have none)."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


@dataclass
class StreamRead:
    client: str
    node: str
    start_id: int
    events: list[tuple[int, str]] = field(default_factory=list)
    """(id, the event's identity: see ``identity``)."""
    ended_by: str = ""


@dataclass
class LogRow:
    id: int
    payload: dict[str, Any]
    epoch: int | None
    writer: str | None


def identity(payload: dict[str, Any]) -> str:
    """What tells two events apart in a comparison of stream and log."""
    return f"{payload.get('source')}:{payload.get('action') or payload.get('observation')}:" + str(
        payload.get("message") or payload.get("extras", {}).get("agent_state") or ""
    )


@dataclass
class History:
    operations: list[Operation] = field(default_factory=list)
    streams: list[StreamRead] = field(default_factory=list)

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.operations:
            counts[op.outcome] = counts.get(op.outcome, 0) + 1
        return counts

    def errors(self) -> dict[str, int]:
        """How often each (code, reason) was answered: what a client met."""
        counts: dict[str, int] = {}
        for op in self.operations:
            if op.code:
                key = f"{op.code}/{op.reason or '-'}"
                counts[key] = counts.get(key, 0) + 1
        return counts


def check(history: History, log: list[LogRow]) -> list[str]:
    """Every violation of the properties below (an empty list: the history is valid).

    1. The log's ids run 0, 1, 2... (no gap, no repeat).
    2. Every acknowledged send is in the log exactly once, at the id it was acknowledged with.
    3. Every user message in the log was sent by a client, in a send that was not answered
       with a definite failure; a send answered only with definite failures left no trace.
    4. Every agent message answers a user message before it, and no user message is answered
       twice (the echo agent answers each once).
    5. Real-time order: a send acknowledged before another send was invoked is before it in
       the log.
    6. Fencing: the epochs of the log never go back, and each epoch has one writer.
    7. Each stream a client read is a gap-free, duplicate-free run of the log from its start.
    """
    problems: list[str] = []
    ids = [row.id for row in log]
    if ids != list(range(len(log))):
        problems.append(f"log ids are not 0..{len(log) - 1}: {ids[:50]}...")

    user_at: dict[str, list[int]] = {}
    answers: dict[str, list[int]] = {}
    for row in log:
        payload = row.payload
        if payload.get("action") != "message":
            continue
        where = user_at if payload.get("source") == "user" else answers
        where.setdefault(str(payload.get("message")), []).append(row.id)

    by_text: dict[str, list[Operation]] = {}
    for op in history.operations:
        by_text.setdefault(op.text, []).append(op)
    for text, attempts in by_text.items():
        stored = user_at.get(text, [])
        acked = [op for op in attempts if op.outcome == "ok"]
        if len(stored) > 1:
            problems.append(f"{text!r} is in the log {len(stored)} times: ids {stored}")
        if acked and not stored:
            problems.append(f"{text!r} was acknowledged ({acked[0].event_id}) but is not stored")
        for op in acked:
            if stored and op.event_id != stored[0]:
                problems.append(
                    f"{text!r} was acknowledged as {op.event_id} through {op.node} but is "
                    f"stored as {stored[0]}"
                )
        if stored and all(op.outcome == "fail" for op in attempts):
            problems.append(
                f"{text!r} is stored although every attempt failed definitely: "
                f"{[(op.code, op.reason) for op in attempts]}"
            )
    for text in user_at:
        if text not in by_text:
            problems.append(f"{text!r} is in the log but no client sent it")

    for text, answered in answers.items():
        asked = user_at.get(text)
        if not asked:
            problems.append(f"an agent message {text!r} answers nothing that was sent")
        elif answered[0] < asked[0]:
            problems.append(f"{text!r} is answered (id {answered[0]}) before it was sent")
        if len(answered) > 1:
            problems.append(f"{text!r} is answered {len(answered)} times: ids {answered}")

    # A send is invoked at its first attempt: a retry acknowledged with the id its first
    # attempt committed under (a request id's recorded answer) is not a later send.
    first_invoked: dict[str, float] = {}
    for op in history.operations:
        first_invoked[op.text] = min(first_invoked.get(op.text, op.invoked), op.invoked)
    acked_ops = sorted(
        (op for op in history.operations if op.outcome == "ok"), key=lambda op: op.completed
    )
    invoked_order = sorted(acked_ops, key=lambda op: first_invoked[op.text])
    # For each acknowledged send, the highest id acknowledged before it was invoked.
    highest = -1
    before = 0
    for op in invoked_order:
        while before < len(acked_ops) and acked_ops[before].completed < first_invoked[op.text]:
            highest = max(highest, acked_ops[before].event_id or -1)
            before += 1
        if op.event_id is not None and op.event_id <= highest:
            problems.append(
                f"{op.text!r} ({op.event_id}) was invoked after a send acknowledged as "
                f"{highest} but is before it in the log"
            )

    epoch_writers: dict[int, set[str]] = {}
    last_epoch = -1
    for row in log:
        if row.epoch is None:
            continue
        if row.epoch < last_epoch:
            problems.append(
                f"event {row.id} was written under epoch {row.epoch} after {last_epoch}"
            )
        last_epoch = max(last_epoch, row.epoch)
        epoch_writers.setdefault(row.epoch, set()).add(str(row.writer))
    for epoch, writers in epoch_writers.items():
        if len(writers) > 1:
            problems.append(f"epoch {epoch} had {len(writers)} writers: {sorted(writers)}")

    stored = {row.id: identity(row.payload) for row in log}
    for read in history.streams:
        expected = list(range(read.start_id, read.start_id + len(read.events)))
        got = [event_id for event_id, _ in read.events]
        if got != expected:
            problems.append(
                f"{read.client}'s stream through {read.node} from {read.start_id} is not "
                f"gap-free: {got[:30]}"
            )
        for event_id, seen in read.events:
            if stored.get(event_id) != seen:
                problems.append(
                    f"{read.client}'s stream got {seen!r} as event {event_id}; the log has "
                    f"{stored.get(event_id)!r}"
                )
                break
    return problems
