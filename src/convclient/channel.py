"""Channel construction shared by the async and sync clients: credentials, message limits and
gRPC's own retry policy."""

from __future__ import annotations

import json
from typing import Any

import grpc

from convclient.config import ClientSettings

SERVICE = "convsvc.v1.ConversationService"

# gRPC retries a call that failed with UNAVAILABLE (nothing reached the service, or it was
# restarting). That is safe for every unary method: reads change nothing, and every mutation
# carries a request_id the client fixed before the first attempt, so the service applies it
# once. The event stream is resumed by the client itself, by event id.
_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Retried on UNAVAILABLE: calls that are safe to repeat (CreateWebhook without an id is not).
UNARY_METHODS = (
    "StartConversation",
    "ForkConversation",
    "JoinConversation",
    "SendEvent",
    "ControlAgent",
    "ConfirmAction",
    "DisconnectConnection",
    "CloseConversation",
    "GetConversation",
    "ListConversations",
    "SearchConversations",
    "UpdateConversation",
    "ListConnections",
    "SearchEvents",
    "Heartbeat",
    "MintToken",
    "RevokeToken",
    "ListAuditEntries",
    "ListWebhooks",
    "DeleteWebhook",
    "ListWebhookDeliveries",
)


def service_config() -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE, "method": method} for method in UNARY_METHODS],
                    "retryPolicy": _RETRY_POLICY,
                }
            ]
        }
    )


def channel_options(settings: ClientSettings, *, retries: bool = True) -> list[tuple[str, Any]]:
    """``retries``: gRPC retries unary calls that fail UNAVAILABLE. A channel to one node of
    a cluster has none: a call that fails there goes through the configured address at once
    (see ``routing``)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Notice a dead peer on a quiet stream within a minute rather than hours.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Reconnect to a restarted service within about a second: by default the wait
        # between attempts grows to two minutes while it is down.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]
    if retries:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", service_config())]
    else:
        options.append(("grpc.enable_retries", 0))
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    return options


def credentials(settings: ClientSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext."""
    if not settings.uses_tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes() if settings.tls_ca_file else None,
        private_key=settings.client_key_file.read_bytes() if settings.client_key_file else None,
        certificate_chain=settings.client_cert_file.read_bytes()
        if settings.client_cert_file
        else None,
    )


def call_metadata(settings: ClientSettings) -> tuple[tuple[str, str], ...]:
    token = settings.resolved_token()
    return (("authorization", f"Bearer {token}"),) if token else ()


def aio_interceptors(settings: ClientSettings) -> list[Any] | None:
    """The asyncio channel's interceptors: OpenTelemetry's when tracing is on."""
    if not settings.tracing:
        return None
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]


def traced(channel: grpc.Channel, settings: ClientSettings) -> grpc.Channel:
    """The blocking channel, with OpenTelemetry's interceptor when tracing is on."""
    if not settings.tracing:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor

    return grpc.intercept_channel(channel, client_interceptor())  # type: ignore[no-untyped-call]


def aio_channel(
    settings: ClientSettings, address: str, *, retries: bool = True
) -> grpc.aio.Channel:
    """An asyncio channel to ``address`` with the settings' credentials and options."""
    options = channel_options(settings, retries=retries)
    interceptors = aio_interceptors(settings)
    credentials_ = credentials(settings)
    if credentials_ is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials_, options, interceptors=interceptors)


def blocking_channel(
    settings: ClientSettings, address: str, *, retries: bool = True
) -> grpc.Channel:
    """A blocking channel to ``address`` with the settings' credentials and options."""
    options = channel_options(settings, retries=retries)
    credentials_ = credentials(settings)
    if credentials_ is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials_, options)
