"""SIGTERM and SIGKILL while many clients send: nothing acknowledged is lost, and with
SIGTERM nothing in flight is cancelled within the grace (issue 8, item 8): a call either
finishes or is refused with UNAVAILABLE, which clients retry."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from convsvc.codec import decode_event
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.helpers import error_info, log_violations

WRITERS = 24
CONVERSATIONS = 3  # the per-user limit: none is evicted


def note(text: str) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"action": "note", "args": {"text": text}})
    return s


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_a_signal_under_load_loses_nothing_acknowledged(
    server_process, tmp_path: Path, tally, signum: signal.Signals
) -> None:
    server = server_process(extra_env={"CONVSVC_SHUTDOWN_GRACE_SECONDS": "5"})
    address = server.start()
    acknowledged: dict[tuple[str, int], str] = {}
    refused: list[tuple[str, str]] = []
    enough = asyncio.Event()
    conversations = [f"load{n}" for n in range(CONVERSATIONS)]
    signalled = False

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        for cid in conversations:
            await stub.StartConversation(pb.StartConversationRequest(conversation_id=cid))

        async def writer(number: int) -> None:
            cid = conversations[number % CONVERSATIONS]
            for n in range(100_000):
                text = f"w{number}-{n}"
                try:
                    reply = await stub.SendEvent(
                        pb.SendEventRequest(conversation_id=cid, event=note(text)), timeout=20
                    )
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    reason = ""
                    with contextlib.suppress(AssertionError):
                        reason = error_info(exc).reason
                    refused.append((code, reason))
                    tally.call("shutdown", code)
                    return
                tally.call("shutdown", "OK")
                acknowledged[(cid, reply.event_id)] = text
                if len(acknowledged) >= 400:
                    enough.set()

        writers = [asyncio.create_task(writer(n)) for n in range(WRITERS)]
        await asyncio.wait_for(enough.wait(), 60)
        assert server.process is not None
        server.process.send_signal(signum)
        signalled = True
        await asyncio.wait_for(asyncio.gather(*writers), 60)
    assert signalled
    assert server.process.wait(30) is not None

    codes = {code for code, _ in refused}
    assert len(refused) == WRITERS  # every writer ended on a refusal, none hung
    if signum == signal.SIGTERM:
        # In flight: finished. New: UNAVAILABLE (SHUTTING_DOWN while draining, or refused
        # by a closed port). Never CANCELLED, never an internal error.
        assert codes == {"UNAVAILABLE"}, [r for r in refused if r[0] != "UNAVAILABLE"]
        tally.checked("SIGTERM: no call cancelled, refusals are UNAVAILABLE", len(refused))
    else:
        assert codes <= {"UNAVAILABLE", "CANCELLED"}, refused

    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "convsvc.sqlite3")) as db:
        rows = db.execute(
            "SELECT conversation_id, id, encoded FROM events ORDER BY conversation_id, id"
        ).fetchall()
    stored: dict[tuple[str, int], dict[str, object]] = {
        (cid, event_id): decode_event(encoded).payload for cid, event_id, encoded in rows
    }
    for (cid, event_id), text in acknowledged.items():
        assert stored[(cid, event_id)]["args"] == {"text": text}, (cid, event_id)
    tally.checked(f"{signum.name}: acknowledged events found after the signal", len(acknowledged))
    for cid in conversations:
        log = [payload for (c, _), payload in sorted(stored.items()) if c == cid]
        assert log_violations(log) == [], cid
        tally.checked("logs gap-free with valid agent states")
