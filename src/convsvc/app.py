"""The convsvc process: store, engine and gRPC server, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from typing import Any

import structlog

from convsvc import tracing
from convsvc.agent_server.records import AGENT_KIND
from convsvc.agent_server.server import build_app as build_agent_server
from convsvc.agents import available_agents
from convsvc.cluster.follow import Followers
from convsvc.cluster.node import ClusterNode
from convsvc.cluster.revocations import RevocationListener
from convsvc.cluster.routing import Router
from convsvc.cluster.servicer import ClusteredServicer
from convsvc.cluster.watch import ClusterWatch
from convsvc.config import Settings
from convsvc.console.routes import STATS_SECONDS, Console
from convsvc.console.session import Sessions
from convsvc.engine import ConversationEngine
from convsvc.metrics import Metrics
from convsvc.storage.postgres import PostgresStore
from convsvc.storage.postgres_directory import PostgresDirectory
from convsvc.storage.sqlite import SqliteStore
from convsvc.transport.access import Access, Auditor
from convsvc.transport.server import GrpcServer
from convsvc.transport.servicer import ConversationServicer
from convsvc.transport.tokens import TokenAuthority, derived_signing_key
from convsvc.web.loopback import Backend
from convsvc.web.server import InLoopServer
from convsvc.webhooks.dispatcher import WebhookDispatcher
from convsvc.webhooks.endpoints import WebhookEndpoints
from convsvc.workers import AgentCatalog, WorkerPool

log = structlog.get_logger(__name__)


class ConvsvcApp:
    """Everything one ``convsvc serve`` runs; usable in-process by tests and benchmarks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        storage = settings.storage
        self.postgres: PostgresStore | None = None
        self.store: SqliteStore | PostgresStore
        if settings.database_url is not None:
            self.postgres = PostgresStore(
                settings.database_url.get_secret_value(),
                password=settings.resolved_database_password(),
                node_id=uuid.uuid4().hex,
                lease_ttl_seconds=settings.cluster.lease_ttl_seconds,
                pool_size=settings.cluster.pool_size,
                group_commit=storage.group_commit,
                activity_interval=storage.activity_write_interval_seconds,
                metrics=self.metrics,
            )
            self.store = self.postgres
        else:
            self.store = SqliteStore(
                storage.sqlite_path,
                synchronous=storage.sqlite_synchronous,
                group_commit=storage.group_commit,
                activity_interval=storage.activity_write_interval_seconds,
                metrics=self.metrics,
            )
        in_process = available_agents()
        self._in_process_agents = set(in_process)
        workers = settings.workers
        if settings.agent_server_listen and AGENT_KIND not in workers.kinds:
            # The API's conversations run on openhands-sdk workers: one may be resumed (or
            # created) before such a worker (re)attaches, and then waits for it.
            workers = workers.model_copy(update={"kinds": (*workers.kinds, AGENT_KIND)})
        self.workers = WorkerPool(
            workers, in_process, max_event_bytes=settings.engine.max_batch_bytes
        )
        self.engine = ConversationEngine(
            settings.engine, self.store, AgentCatalog(in_process, self.workers)
        )
        self.webhooks = WebhookEndpoints(self.store, settings.webhooks)
        self._dispatcher: WebhookDispatcher | None = None
        self.server: GrpcServer | None = None
        self.cluster: ClusterNode | None = None
        self._router: Router | None = None
        self._followers: Followers | None = None
        self._metrics_server: Any = None
        self._revocations: RevocationListener | None = None
        self._tracer_provider: Any = None
        self._http_servers: list[InLoopServer] = []
        self._loopback: Backend | None = None
        self.agent_server_address: str | None = None
        self.console_address: str | None = None

    async def start(self) -> str:
        """Opens the store, starts the engine and serves; returns the bound host:port."""
        if self.settings.tracing:
            self._tracer_provider = tracing.configure("convsvc")
        await self.store.open()
        await self.engine.start()
        self.workers.start()
        servicer: ConversationServicer | None = None
        if self.postgres is not None:
            directory = PostgresDirectory(self.postgres)
            # The address is known once bound; the node registers right after.
            self.cluster = ClusterNode(
                self.settings.cluster,
                self.postgres,
                directory,
                self.engine,
                self.settings.advertise_address or "",
                limit=self.settings.engine.max_concurrent_conversations,
                in_process_agents=self._in_process_agents,
                workers=self.workers,
                metrics=self.metrics,
            )
            self._router = Router(
                self.cluster,
                self.postgres,
                directory,
                self.engine,
                auth_token=self.settings.resolved_auth_token(),
                max_message_bytes=self.settings.max_message_bytes,
                metrics=self.metrics,
                keepalive_seconds=self.settings.cluster.peer_keepalive_seconds,
            )
            self._followers = Followers(self.cluster, self.postgres, self.engine, self._router)
            watch = ClusterWatch(
                directory,
                self.engine,
                self._router.watch_peer,
                self.settings.cluster.heartbeat_interval_seconds,
            )
            servicer = ClusteredServicer(self.engine, self._router, self._followers, watch)
        servicer = servicer or ConversationServicer(self.engine)
        servicer.webhooks = self.webhooks
        servicer.workers = self.workers.views
        if self.postgres is not None:
            servicer.nodes = PostgresDirectory(self.postgres).node_views
        await self.webhooks.register_configured()
        self._dispatcher = WebhookDispatcher(
            self.store,
            self.settings.webhooks,
            self.cluster.node_id if self.cluster is not None else "local",
        )
        self.store.add_commit_listener(self._dispatcher.on_commit)
        self._dispatcher.start()
        access = self._access()
        servicer.secure(access, Auditor(self.store, log_records=self.settings.audit_log))
        if self.postgres is not None:
            self._revocations = RevocationListener(self.postgres, access.streams)
            self._revocations.start()
        self.server = GrpcServer(
            self.engine,
            self.settings.listen,
            worker_pool=self.workers,
            auth_token=self.settings.resolved_auth_token(),
            tls=self.settings.tls,
            max_message_bytes=self.settings.max_message_bytes,
            servicer=servicer,
            tracing=self.settings.tracing,
            metrics=self.metrics,
        )
        if self.cluster is not None and self._router is not None:
            self.cluster.address = self.cluster.address or self.server.address
            servicer.node_address = self.cluster.address
            await self.cluster.register()
            self.cluster.start(self.server.set_serving, self._router.evict_remote)
        await self.server.start()
        if self.settings.metrics_listen:
            followers = self._followers
            self._metrics_server = self.metrics.serve(
                self.settings.metrics_listen,
                self.engine.queries.gauges,
                self.workers.gauges,
                (lambda: followers.count) if followers is not None else None,
            )
        address = self.server.address
        await self._start_front_doors(address)
        if self.settings.ready_file is not None:
            tmp = self.settings.ready_file.with_suffix(".tmp")
            tmp.write_text(address)
            tmp.replace(self.settings.ready_file)  # readers never see a half-written file
        if self.cluster is not None:
            log.info(
                "server.serving",
                address=address,
                database=self.settings.shown_database(),
                node_id=self.cluster.node_id,
                advertised=self.cluster.address,
            )
        else:
            log.info("server.serving", address=address, data_dir=str(self.settings.data_dir))
        return address

    async def _start_front_doors(self, grpc_address: str) -> None:
        """The HTTP front doors that are on: clients of this node's own gRPC service."""
        settings = self.settings
        host, _, port = grpc_address.rpartition(":")
        if host in ("", "0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        self._loopback = Backend(f"{host}:{port}", settings.max_message_bytes)
        token = settings.resolved_auth_token()
        if settings.agent_server_listen:
            secret = settings.agent_server_secret_key
            api = build_agent_server(
                self._loopback,
                secret=secret.get_secret_value() if secret is not None else token,
                auth_required=bool(token),
                start_timeout_seconds=settings.agent_server_start_timeout_seconds,
            )
            server = InLoopServer(api, settings.agent_server_listen, "agent_server")
            self.agent_server_address = await server.start()
            self._http_servers.append(server)
        if settings.console_listen:
            sessions = Sessions(
                auth_required=bool(token), secure_cookie=settings.console_secure_cookie
            )
            console = Console(self._loopback, sessions, self._console_stats).app()
            server = InLoopServer(console, settings.console_listen, "console")
            self.console_address = await server.start()
            self._http_servers.append(server)

    def _console_stats(self) -> dict[str, Any]:
        """This node's figures for the console's chart: running conversations, and the
        events committed so far (the page turns them into a rate)."""
        running = self.engine.queries.gauges().conversations_by_status.get("running", 0)
        committed = sum(
            sample.value
            for metric in self.metrics.registry.collect()
            if metric.name == "convsvc_commit_batch_events"
            for sample in metric.samples
            if sample.name.endswith("_sum")
        )
        return {"running": running, "events_total": committed, "interval_seconds": STATS_SECONDS}

    def _access(self) -> Access:
        """Who may call: the service token, and scoped tokens signed with the configured key
        or, by default, one derived from the service token."""
        service_token = self.settings.resolved_auth_token()
        key = self.settings.resolved_token_signing_key()
        if key is None and service_token:
            key = derived_signing_key(service_token)
        authority = (
            TokenAuthority(key, self.settings.token_max_ttl_seconds) if key is not None else None
        )

        def conversation_of_connection(connection_id: str) -> str | None:
            connection = self.engine.queries.local_connection(connection_id)
            return connection.conversation_id if connection is not None else None

        return Access(service_token, authority, self.store, conversation_of_connection)

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, streams end (clients resume elsewhere), calls in
        flight finish, loops close, the store flushes."""
        log.info("server.stopping")
        for http_server in self._http_servers:
            await http_server.stop()
        if self._loopback is not None:
            await self._loopback.close()
        if self.server is not None:
            await self.server.enter_shutdown()
            if self.cluster is not None:
                # Drain: loops are handed to other nodes (no ``stopped``) before streams end,
                # so subscribers that resume elsewhere find them running.
                await self.engine.hand_off_all()
                await self.cluster.stop()  # no heartbeat may renew it after it leaves
                await self.cluster.leave()
            self.engine.end_streams()
            if not await self.server.drain(self.settings.shutdown_grace_seconds):
                log.warning("server.grace_exceeded", grace=self.settings.shutdown_grace_seconds)
            # Nothing is in flight any more (or the grace is over): stop listening at once.
            await self.server.stop(0)
        await self.engine.stop()
        await self.workers.stop()
        if self._dispatcher is not None:
            # What is not sent yet stays in the outbox: the next start sends it.
            await self._dispatcher.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        if self._followers is not None:
            await self._followers.stop()
        if self._revocations is not None:
            await self._revocations.stop()
        if self._router is not None:
            await self._router.close()
        await self.store.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._tracer_provider is not None:
            # Exports the spans still batched (off the event loop: it blocks).
            await asyncio.to_thread(self._tracer_provider.shutdown)
        log.info("server.stopped")


async def run(settings: Settings) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully."""
    app = ConvsvcApp(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()
