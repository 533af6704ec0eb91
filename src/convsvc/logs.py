"""Structured logging (structlog), JSON by default, with secrets masked."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from convsvc.redaction import redact


def _mask_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Defence in depth: code never logs settings, but a secret-named field is masked anyway.
    masked: MutableMapping[str, Any] = redact(dict(event_dict))
    return masked


class ClientGone(logging.Filter):
    """grpc logs a client that went away while its stream was being written (a deadline, a
    cancel, a closed connection) as an error with a traceback: routine for long-lived
    streams, so it becomes one info record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("ExecuteBatchError raised in core by servicer method"):
            method = message.partition("[")[2].rstrip("]")
            record.msg, record.args = "stream.client_gone method=%s", (method,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


GRPC_LOGGER = "grpc._cython.cygrpc"


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Sends structured logs to stderr; call once at start-up.

    Records of other libraries' standard loggers (grpc, asyncio) go through the same
    processors, so the log stays one JSON object per line, tracebacks included.
    """
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _mask_secrets,
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    grpc_logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, ClientGone) for f in grpc_logger.filters):
        grpc_logger.addFilter(ClientGone())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
