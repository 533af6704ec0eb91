"""The grpc.aio server: ConversationService, AgentWorkerService (workers attach), health,
reflection, authentication, TLS and tracing."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from convsvc.config import TlsConfig
from convsvc.engine import ConversationEngine
from convsvc.metrics import Metrics
from convsvc.tracing import server_interceptor
from convsvc.transport.auth import BearerTokenInterceptor
from convsvc.transport.reflection import enable_reflection
from convsvc.transport.service import SERVICE_NAME, CallGate, conversation_service_handler
from convsvc.transport.servicer import ConversationServicer
from convsvc.transport.workers import (
    WORKER_SERVICE_NAME,
    AgentWorkerServicer,
    agent_worker_handler,
)
from convsvc.workers import WorkerPool


class GrpcServer:
    """Owns the grpc.aio server and its health status."""

    def __init__(
        self,
        engine: ConversationEngine,
        listen: str,
        *,
        worker_pool: WorkerPool | None = None,
        auth_token: str | None = None,
        tls: TlsConfig | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        servicer: ConversationServicer | None = None,
        tracing: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        # Tracing first: a call refused for its credentials is traced too.
        interceptors: list[Any] = [server_interceptor()] if tracing else []
        if auth_token:
            interceptors.append(BearerTokenInterceptor(auth_token))
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Peers forwarding to this node ping it every second or so to notice a
                # partition quickly (see cluster.routing); allow that without a strike.
                ("grpc.http2.min_ping_interval_without_data_ms", 500),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        self._health = health.aio.HealthServicer()
        self._gate = CallGate()
        self._servicer = servicer or ConversationServicer(engine)
        self._server.add_generic_rpc_handlers(
            (
                conversation_service_handler(
                    self._servicer, self._gate, metrics or Metrics(), self._not_serving
                ),
            )
        )
        services = [SERVICE_NAME, health.SERVICE_NAME]
        if worker_pool is not None:
            self._server.add_generic_rpc_handlers(
                (agent_worker_handler(AgentWorkerServicer(worker_pool, self._gate)),)
            )
            services.append(WORKER_SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        enable_reflection(self._server, services)
        if tls is None:
            self.port = self._server.add_insecure_port(listen)
        else:
            self.port = self._server.add_secure_port(listen, _credentials(tls))
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.host = listen.rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        """host:port actually bound (the port is chosen by the OS when 0 was asked)."""
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _not_serving(self) -> None:
        # A failed store accepts no writes: balancers should send traffic elsewhere.
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        """Reports whether this server can serve (e.g. while its database is away)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def enter_shutdown(self) -> None:
        """Reports NOT_SERVING so that balancers stop sending new calls."""
        await self._health.enter_graceful_shutdown()

    async def drain(self, grace: float) -> bool:
        """Answers new calls UNAVAILABLE/SHUTTING_DOWN (the server still accepts them, so
        clients get a status they retry rather than a cancellation) and waits up to ``grace``
        seconds for the calls in flight; True when they all finished."""
        return await self._gate.close_and_drain(grace)

    async def stop(self, grace: float) -> None:
        """Stops listening; calls still running after ``grace`` seconds are cancelled."""
        await self._server.stop(grace)
        await self._servicer.close()


def _credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    key = tls.key_file.read_bytes()
    cert = tls.cert_file.read_bytes()
    if tls.client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=tls.client_ca_file.read_bytes(),
        require_client_auth=True,
    )
