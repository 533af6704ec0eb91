"""Real `convsvc serve` nodes on one real PostgreSQL (see tests/postgres.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess
from tests.workers.conftest import start_worker  # noqa: F401  (a fixture used here too)

# Short leases keep the takeover tests quick; the defaults are in the README.
FAST_CLUSTER = {
    "CONVSVC_CLUSTER__LEASE_TTL_SECONDS": "3",
    "CONVSVC_CLUSTER__HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "CONVSVC_CLUSTER__TAKEOVER_SCAN_SECONDS": "0.5",
    "CONVSVC_SHUTDOWN_GRACE_SECONDS": "2",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    process: ServerProcess
    metrics_address: str = ""
    channel: grpc.aio.Channel | None = None

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples on this node (those with ``labels``)."""
        url = f"http://{self.metrics_address}/metrics"
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode()
        )
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    @property
    def address(self) -> str:
        return self.process.address

    @property
    def stub(self) -> pb_grpc.ConversationServiceStub:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.address)
        return pb_grpc.ConversationServiceStub(self.channel)

    def logs(self) -> str:
        return self.process.logs()


@dataclass
class Cluster:
    dsn: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def start_node(self, **extra_env: str) -> Node:
        home = self.root / f"node{len(self.nodes)}"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
        env.update(FAST_CLUSTER)
        env.update({"CONVSVC_DATABASE_URL": self.dsn, "CONVSVC_LOG_LEVEL": "INFO"})
        env.update(self.env)
        env.update(extra_env)
        for attempt in range(3):
            metrics = f"127.0.0.1:{free_port()}"
            node = Node(
                ServerProcess(home / "data", {**env, "CONVSVC_METRICS_LISTEN": metrics}), metrics
            )
            try:
                node.process.start()
                break
            except RuntimeError as exc:
                # The free port was taken by another process (the suites run side by side)
                # before this node bound it: another one.
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
        self.nodes.append(node)
        return node


@pytest.fixture
async def cluster(postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(nodes: int = 3, **env: str) -> Cluster:
        group = Cluster(postgres_dsn, tmp_path, dict(env))
        for _ in range(nodes):
            group.start_node()
        made.append(group)
        return group

    yield make
    for group in made:
        for node in group.nodes:
            if node.channel is not None:
                await node.channel.close()
            process = node.process.process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
