"""``convsvc health``: asks a running server's gRPC health service whether it serves, for
container health checks and scripts (exit status 0 when SERVING, 1 otherwise)."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsvc.transport.service import SERVICE_NAME


def local_address(listen: str) -> str:
    """The address to reach a server listening on ``listen`` from the same host."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def check_health(address: str, *, timeout: float, tls_ca_file: Path | None = None) -> int:
    if tls_ca_file is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca_file.read_bytes())
        channel = grpc.secure_channel(address, credentials)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"convsvc at {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"convsvc at {address}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1
