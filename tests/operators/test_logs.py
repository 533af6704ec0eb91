"""What operators read in the log: one JSON object per line, and routine events (a client going
away) not reported as errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


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
