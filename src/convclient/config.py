"""Where the service is and how to reach it: ``CONVSVC_*`` environment variables or arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Connection settings; arguments override the environment.

    The server reads other ``CONVSVC_*`` variables; this class ignores them, so client and
    server can share an environment.
    """

    model_config = SettingsConfigDict(env_prefix="CONVSVC_", extra="ignore", frozen=True)

    address: str = "127.0.0.1:50051"
    """host:port of convsvc (CONVSVC_ADDRESS)."""
    token: SecretStr | None = None
    """Bearer token sent with every call (CONVSVC_TOKEN)."""
    token_file: Path | None = None
    """File holding the bearer token (CONVSVC_TOKEN_FILE)."""
    tls: bool = False
    """Use TLS (CONVSVC_TLS); implied by any of the TLS files below."""
    tls_ca_file: Path | None = None
    """CA that signed the server's certificate; the system's roots when unset."""
    client_cert_file: Path | None = None
    """Client certificate, for servers that require mTLS."""
    client_key_file: Path | None = None
    tls_server_name: str | None = None
    """Name to verify in the server's certificate, when it differs from the address's host."""
    timeout_seconds: float = Field(10.0, gt=0)
    """Deadline of each call, retries included."""
    stream_reconnect_seconds: float = Field(30.0, ge=0)
    """How long an event tail keeps trying to reconnect before it gives up."""
    tracing: bool = False
    """Spans for every call, continuing the caller's trace (CONVSVC_TRACING; needs the
    ``tracing`` extra: opentelemetry-instrumentation-grpc)."""
    max_message_bytes: int = Field(4 * 1024 * 1024, gt=0)
    route_to_owner: bool = True
    """In a cluster, send each conversation's calls to the node that runs it, as the
    service reports it (CONVSVC_ROUTE_TO_OWNER). Turn off when this client cannot reach the
    nodes' advertised addresses: every call then goes to ``address``, which forwards it."""

    @model_validator(mode="after")
    def _check(self) -> ClientSettings:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("CONVSVC_CLIENT_CERT_FILE and CONVSVC_CLIENT_KEY_FILE go together")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set CONVSVC_TOKEN or CONVSVC_TOKEN_FILE, not both")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca_file is not None or self.client_cert_file is not None

    def resolved_token(self) -> str | None:
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            return self.token_file.read_text().strip() or None
        return None
