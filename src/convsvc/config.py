"""Configuration, read once at start-up from ``CONVSVC_*`` environment variables and flags.

Small typed objects per concern, passed down. The only other variables read are
OpenTelemetry's own ``OTEL_*`` (see ``tracing``), which its exporter reads itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from convsvc.domain import AdmissionPolicy, BusyPolicy, WebhookEventType

MIN_SIGNING_KEY_BYTES = 32
MESSAGE_OVERHEAD_BYTES = 64 * 1024
"""Room in a response for what is not event bytes (framing, page token, status update)."""


class EngineConfig(BaseModel):
    """The rules the engine keeps (OpenHands' defaults where it has one)."""

    model_config = {"frozen": True}

    max_concurrent_conversations: int = Field(3, ge=1)
    """Running conversations per user; what a start does at the limit is its admission
    policy (by default, OpenHands': the least recently active loops stop)."""
    admission_policy: AdmissionPolicy = AdmissionPolicy.EVICT_OLDEST
    """The policy of starts (and joins) that do not name one."""
    allow_admission_policy_override: bool = False
    """Whether a start may name a policy that stops more than the server's (evict_oldest on
    a server that rejects or queues); a gentler one is always allowed."""
    busy_policy: BusyPolicy = BusyPolicy.ENQUEUE
    """What a message sent while the agent is busy does, unless the send names a policy."""
    control_timeout_seconds: float = Field(30.0, gt=0)
    """How long ControlAgent (and a send that interrupts) waits for the agent to report the
    state it asked for before the agent is reported unresponsive."""
    queue_timeout_seconds: float = Field(300.0, gt=0)
    """The longest a start waits in the admission queue (a shorter call deadline wins)."""
    watch_history: int = Field(10_000, ge=16)
    """Conversation changes kept so that watchers can resume after a reconnect."""
    watch_max_lag: int = Field(5_000, ge=1)
    """Changes a watcher may fall behind before it is dropped (it then resumes)."""
    close_delay_seconds: float = Field(3600.0, ge=0)
    """Idle time after which a loop that is not running and has no connection is closed."""
    cleanup_interval_seconds: float = Field(15.0, gt=0)
    connection_ttl_seconds: float = Field(60.0, gt=0)
    """How long connections of a client instance live without a heartbeat."""
    subscriber_buffer_events: int = Field(10_000, ge=1)
    """Events a live subscriber may fall behind before it is dropped."""
    subscriber_buffer_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Bytes of events a live subscriber may fall behind before it is dropped."""
    max_event_bytes: int = Field(1024 * 1024, ge=1024)
    """The largest event a user may send, measured in its stored encoding."""
    max_batch_bytes: int = Field(3 * 1024 * 1024, ge=4096)
    """The most event bytes in one response (stream batch or search page), and so the largest
    event an agent may emit: every stored event can always be read."""
    max_replay_events: int = Field(1000, ge=0)
    """The most replay_events one start may carry."""
    default_agent: str = "echo"
    idempotency_ttl_seconds: float = Field(24 * 3600.0, gt=0)
    default_page_size: int = 100
    max_page_size: int = 1000
    max_stream_batch: int = 1000

    @model_validator(mode="after")
    def _watchers_resume_within_the_history(self) -> EngineConfig:
        if self.watch_max_lag >= self.watch_history:
            raise ValueError(
                "CONVSVC_ENGINE__WATCH_MAX_LAG must be below CONVSVC_ENGINE__WATCH_HISTORY, "
                "so that a dropped watcher can resume"
            )
        return self


class WorkersConfig(BaseModel):
    """Agent workers: processes that attach over the worker protocol and run agent loops."""

    model_config = {"frozen": True}

    kinds: tuple[str, ...] = ("openhands",)
    """Agent kinds that run on workers and may be started before a worker for them attaches
    (kinds a worker announces are added as it attaches)."""
    ping_interval_seconds: float = Field(5.0, gt=0)
    """How often a worker must say something."""
    silence_timeout_seconds: float = Field(15.0, gt=0)
    """A worker silent this long is detached and its conversations go to other workers."""
    stop_timeout_seconds: float = Field(10.0, gt=0)
    """How long a close waits for a worker to release the conversation's loop."""
    max_unread_messages: int = Field(10_000, ge=16)
    """Messages a worker may leave unread before it is detached (WORKER_TOO_SLOW)."""
    max_unread_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    """Bytes of messages a worker may leave unread before it is detached (WORKER_TOO_SLOW);
    at least one message of any size is always queued."""
    max_restarts: int = Field(3, ge=0)
    """Assignments in a row that may fail before any event is logged; then the loop reports
    an error and waits for the user's next message to try again."""

    @model_validator(mode="after")
    def _silence_outlasts_pings(self) -> WorkersConfig:
        if self.silence_timeout_seconds <= self.ping_interval_seconds:
            raise ValueError(
                "CONVSVC_WORKERS__SILENCE_TIMEOUT_SECONDS must exceed "
                "CONVSVC_WORKERS__PING_INTERVAL_SECONDS"
            )
        return self


class ClusterConfig(BaseModel):
    """Clustered mode (with a database URL): leases, takeover and forwarding."""

    model_config = {"frozen": True}

    lease_ttl_seconds: float = Field(10.0, gt=0)
    """A node whose heartbeat is older than this is dead and its conversations move."""
    heartbeat_interval_seconds: float = Field(2.0, gt=0)
    """How often a node renews its heartbeat (and so all its leases)."""
    takeover_scan_seconds: float = Field(1.0, gt=0)
    """How often a node looks for conversations whose owner is dead or that were handed
    over, and claims them."""
    crash_check_seconds: float = Field(0.2, gt=0)
    """How often a node checks whether another node crashed (its liveness lock released with
    its process): a crashed node's conversations are taken over then, not when its lease
    runs out."""
    peer_keepalive_seconds: float = Field(1.0, gt=0)
    """How often a node pings each peer it forwards to, and how long it waits for the answer
    (and for a connection): a peer cut off from this node is noticed within twice this, and
    calls forwarded to it then fail at once (OWNER_UNREACHABLE) instead of at their deadline."""
    takeover_batch: int = Field(100, ge=1)
    """The most conversations one scan claims."""
    pool_size: int = Field(8, ge=1)
    """Connections to PostgreSQL per node."""

    @model_validator(mode="after")
    def _heartbeats_outpace_the_ttl(self) -> ClusterConfig:
        if self.heartbeat_interval_seconds * 2 > self.lease_ttl_seconds:
            raise ValueError(
                "CONVSVC_CLUSTER__LEASE_TTL_SECONDS must be at least twice "
                "CONVSVC_CLUSTER__HEARTBEAT_INTERVAL_SECONDS"
            )
        return self


class ConfiguredWebhook(BaseModel):
    """An endpoint registered by configuration (kept in step at every start)."""

    model_config = {"frozen": True}

    url: str
    event_types: tuple[WebhookEventType, ...] = ()
    """All types when empty."""
    secret: SecretStr | None = None
    """A Standard Webhooks secret ("whsec_..."); made and logged once when unset."""
    description: str = ""


class WebhookConfig(BaseModel):
    """Webhook delivery: endpoints, where they may point, and how hard to try."""

    model_config = {"frozen": True}

    endpoints: tuple[ConfiguredWebhook, ...] = ()
    """Endpoints registered at start (JSON in CONVSVC_WEBHOOKS__ENDPOINTS), besides those
    CreateWebhook registers."""
    allow_private_targets: bool = False
    """Whether endpoints may be on loopback, link-local or private addresses (refused by
    default: a caller could otherwise make the server call into its own network)."""
    retry_schedule_seconds: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0)
    """The wait before each retry; a delivery is dead after one attempt more than listed."""
    timeout_seconds: float = Field(10.0, gt=0)
    """How long an endpoint has to answer an attempt."""
    poll_interval_seconds: float = Field(1.0, gt=0)
    """How often due retries (and, in a cluster, other nodes' notifications) are looked for."""
    concurrency: int = Field(16, ge=1)
    """Deliveries in flight at once per node."""
    lease_seconds: float = Field(60.0, gt=0)
    """How long a node holds a delivery it is sending (another may send it after that)."""


class TlsConfig(BaseModel):
    """Server TLS; with ``client_ca_file`` clients must present a certificate (mTLS)."""

    model_config = {"frozen": True}

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class StorageConfig(BaseModel):
    """Where and how the event log is kept."""

    model_config = {"frozen": True}

    data_dir: Path
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    group_commit: bool = True
    activity_write_interval_seconds: float = 1.0

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "convsvc.sqlite3"


class Settings(BaseSettings):
    """Everything ``convsvc serve`` needs; flags override the environment."""

    model_config = SettingsConfigDict(env_prefix="CONVSVC_", env_nested_delimiter="__")

    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("./convsvc-data")
    ready_file: Path | None = None
    """Written with the bound host:port once the server serves (useful with port 0)."""
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None
    token_signing_key: SecretStr | None = None
    """Signs scoped tokens (MintToken); derived from the service token when unset."""
    token_signing_key_file: Path | None = None
    token_max_ttl_seconds: float = Field(7 * 24 * 3600.0, gt=0)
    """The longest a scoped token may live."""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    group_commit: bool = True
    activity_write_interval_seconds: float = Field(1.0, ge=0)
    """How often at most a conversation's last activity and agent state are stored (for
    SearchConversations): each commit storing them cost a busy send path ~9 %."""
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    shutdown_grace_seconds: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    use_uvloop: bool = True
    metrics_listen: str | None = None
    """host:port for a Prometheus /metrics endpoint; off when unset."""
    console_listen: str | None = None
    """host:port for the operator console (a web page); off when unset."""
    console_secure_cookie: bool = False
    """Mark the console's session cookie Secure (serve the console behind HTTPS then)."""
    console_allow_remote_without_auth: bool = False
    """Without a service token the console serves only on loopback, unless this is set."""
    agent_server_listen: str | None = None
    """host:port for the OpenHands agent-server API (1.x clients); off when unset. Its
    session keys are convsvc's tokens (the service token or scoped tokens)."""
    agent_server_secret_key: SecretStr | None = None
    """Encrypts the secrets in the conversation snapshots convsvc stores (the SDK's cipher,
    as a stock agent-server's OH_SECRET_KEY); derived from the service token when unset.
    Without either, secrets do not survive a restart (as on a stock server without a key)."""
    agent_server_start_timeout_seconds: float = Field(120.0, gt=0)
    """How long a create waits for an openhands-sdk worker to set the conversation up."""
    tracing: bool = False
    """OpenTelemetry spans exported over OTLP (configured by the OTEL_* variables)."""
    audit_log: bool = False
    """Every audit entry also as an ``audit`` record in the structured log (one per mutating
    call, sends included); the store keeps them either way (ListAuditEntries)."""
    database_url: SecretStr | None = None
    """postgresql://user@host:port/db: clustered mode on PostgreSQL (else embedded SQLite)."""
    database_password_file: Path | None = None
    """The database password, read from this file (kept out of the URL and the logs)."""
    advertise_address: str | None = None
    """host:port other nodes and routing clients use to reach this one (default: the bound
    address)."""
    engine: EngineConfig = EngineConfig()
    workers: WorkersConfig = WorkersConfig()
    cluster: ClusterConfig = ClusterConfig()
    webhooks: WebhookConfig = WebhookConfig()

    @model_validator(mode="after")
    def _events_fit_in_messages(self) -> Settings:
        room = self.max_message_bytes - MESSAGE_OVERHEAD_BYTES
        if self.engine.max_batch_bytes > room:
            raise ValueError(
                f"CONVSVC_ENGINE__MAX_BATCH_BYTES ({self.engine.max_batch_bytes}) must leave "
                f"{MESSAGE_OVERHEAD_BYTES} bytes of CONVSVC_MAX_MESSAGE_BYTES "
                f"({self.max_message_bytes}) for the rest of a response"
            )
        if self.engine.max_event_bytes > self.engine.max_batch_bytes:
            raise ValueError(
                "CONVSVC_ENGINE__MAX_EVENT_BYTES must not exceed CONVSVC_ENGINE__MAX_BATCH_BYTES"
            )
        return self

    @model_validator(mode="after")
    def _signing_key_long_enough(self) -> Settings:
        key = self.token_signing_key
        if key is not None and len(key.get_secret_value().encode()) < MIN_SIGNING_KEY_BYTES:
            raise ValueError(
                f"CONVSVC_TOKEN_SIGNING_KEY must be at least {MIN_SIGNING_KEY_BYTES} bytes long "
                "(RFC 7518: an HS256 key as long as the hash)"
            )
        return self

    @model_validator(mode="after")
    def _console_behind_auth(self) -> Settings:
        listen = self.console_listen
        if listen is None or self.console_allow_remote_without_auth:
            return self
        host = listen.rpartition(":")[0].strip("[]")
        if (
            self.auth_token is None
            and self.auth_token_file is None
            and host not in ("127.0.0.1", "localhost", "::1")
        ):
            raise ValueError(
                "the console without a service token serves only on loopback: listen on "
                "127.0.0.1, set CONVSVC_AUTH_TOKEN, or set "
                "CONVSVC_CONSOLE_ALLOW_REMOTE_WITHOUT_AUTH=true"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("CONVSVC_TLS_CERT_FILE and CONVSVC_TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("CONVSVC_TLS_CLIENT_CA_FILE needs CONVSVC_TLS_CERT_FILE")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("set CONVSVC_AUTH_TOKEN or CONVSVC_AUTH_TOKEN_FILE, not both")
        return self

    @property
    def tls(self) -> TlsConfig | None:
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return TlsConfig(
            cert_file=self.tls_cert_file,
            key_file=self.tls_key_file,
            client_ca_file=self.tls_client_ca_file,
        )

    @property
    def storage(self) -> StorageConfig:
        return StorageConfig(
            data_dir=self.data_dir,
            sqlite_synchronous=self.sqlite_synchronous,
            group_commit=self.group_commit,
            activity_write_interval_seconds=self.activity_write_interval_seconds,
        )

    def resolved_database_password(self) -> str | None:
        """The database password from its file, when one is named."""
        if self.database_password_file is None:
            return None
        password = self.database_password_file.read_text().strip()
        if not password:
            raise ValueError(f"{self.database_password_file} is empty")
        return password

    def shown_database(self) -> str:
        """The database URL without its password, for logs."""
        if self.database_url is None:
            return ""
        parsed = urlsplit(self.database_url.get_secret_value())
        host = parsed.hostname or ""
        port = f":{parsed.port}" if parsed.port else ""
        user = f"{parsed.username}@" if parsed.username else ""
        return f"{parsed.scheme}://{user}{host}{port}{parsed.path}"

    def resolved_token_signing_key(self) -> bytes | None:
        """The key set to sign scoped tokens, or read from its file; None when neither is
        (the server then derives one from the service token, if it has one)."""
        if self.token_signing_key is not None:
            return self.token_signing_key.get_secret_value().encode()
        if self.token_signing_key_file is not None:
            key = self.token_signing_key_file.read_bytes().strip()
            if len(key) < MIN_SIGNING_KEY_BYTES:
                raise ValueError(
                    f"{self.token_signing_key_file} must hold at least {MIN_SIGNING_KEY_BYTES} "
                    "bytes (RFC 7518: an HS256 key as long as the hash)"
                )
            return key
        return None

    def resolved_auth_token(self) -> str | None:
        """The bearer token, read from the file when one is named."""
        if self.auth_token is not None:
            return self.auth_token.get_secret_value()
        if self.auth_token_file is not None:
            token = self.auth_token_file.read_text().strip()
            if not token:
                raise ValueError(f"{self.auth_token_file} is empty")
            return token
        return None
