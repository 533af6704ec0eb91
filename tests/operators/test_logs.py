"""What operators read in the log: one JSON object per line, and routine events (a client going
away) not reported as errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

from convsvc.domain import AuditQuery
from convsvc.storage.sqlite import SqliteStore
from convsvc.transport.access import SERVICE, Auditor
from convsvc.v1 import conversation_service_pb2 as pb


def log_lines_of(code: str) -> list[dict[str, object]]:
    """The JSON records a snippet logs after ``configure_logging`` (in a process of its own:
    logging is process-wide)."""
    program = textwrap.dedent(
        """
        from convsvc.logs import configure_logging
        configure_logging()
        """
    ) + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    return [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]


def test_a_client_gone_while_its_stream_was_written_is_info_without_a_traceback() -> None:
    # What grpc's server logs when a client cancels or closes its connection while a
    # response of its stream is being sent.
    [record] = log_lines_of(
        """
        import logging
        try:
            raise RuntimeError("Failed execute_batch")
        except RuntimeError:
            logging.getLogger("grpc._cython.cygrpc").exception(
                "ExecuteBatchError raised in core by servicer method "
                "[/convsvc.v1.ConversationService/StreamEvents]"
            )
        """
    )
    assert record["level"] == "info"
    assert record["event"] == (
        "stream.client_gone method=/convsvc.v1.ConversationService/StreamEvents"
    )
    assert "exception" not in record


def test_other_grpc_errors_stay_errors() -> None:
    [record] = log_lines_of(
        """
        import logging
        logging.getLogger("grpc._cython.cygrpc").error("something else broke")
        """
    )
    assert record["level"] == "error"


@pytest.mark.parametrize("asked", [False, True])
async def test_audit_entries_reach_the_log_only_when_asked(tmp_path: Path, asked: bool) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        auditor = Auditor(store, log_records=asked)
        request = pb.SendEventRequest(conversation_id="c1", user_id="alice")
        with structlog.testing.capture_logs() as records:
            auditor.record("SendEvent", request, SERVICE, None)
        await store.submit_events(())  # a barrier: what was audited before it is stored
        [entry] = await store.list_audit(AuditQuery())  # stored either way
        assert (entry.method, entry.conversation_id, entry.user_id) == ("SendEvent", "c1", "alice")
        audit_records = [r for r in records if r["event"] == "audit"]
        if asked:
            assert audit_records == [
                {
                    "event": "audit",
                    "log_level": "info",
                    "method": "SendEvent",
                    "code": "OK",
                    "credential": "service",
                    "user_id": "alice",
                    "conversation_id": "c1",
                }
            ]
        else:
            assert audit_records == []
    finally:
        await store.close()
