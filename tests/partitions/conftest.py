"""A convsvc cluster in a private network (see netlab): PostgreSQL and each node in a network
namespace of their own, the test's clients outside on the bridge."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess
from tests.partitions.netlab import Host, Lab
from tests.postgres import PostgresServer, postgres_bin_dir

# Leases short enough for a test to sit through several; the defaults are in the README.
LAB_CLUSTER = {
    "CONVSVC_CLUSTER__LEASE_TTL_SECONDS": "3",
    "CONVSVC_CLUSTER__HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "CONVSVC_CLUSTER__TAKEOVER_SCAN_SECONDS": "0.5",
    "CONVSVC_SHUTDOWN_GRACE_SECONDS": "2",
    "CONVSVC_LOG_LEVEL": "INFO",
}
NODE_PORT = 7000
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts" / "partitions"
PROXY_PORT = 6432


@pytest.fixture
def seed() -> int:
    """The seed of a test's random schedule: printed, and taken from CONVSVC_PARTITION_SEED
    to replay a failed run."""
    chosen = int(os.environ.get("CONVSVC_PARTITION_SEED") or random.randrange(1_000_000))
    print(f"partition schedule seed: {chosen} (replay: CONVSVC_PARTITION_SEED={chosen})")
    return chosen


@dataclass
class LabNode:
    name: str
    host: Host
    process: ServerProcess
    channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return f"{self.host.address}:{NODE_PORT}"

    @property
    def stub(self) -> pb_grpc.ConversationServiceStub:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.address)
        return pb_grpc.ConversationServiceStub(self.channel)

    def logs(self) -> str:
        return self.process.logs()


@dataclass
class LabCluster:
    lab: Lab
    postgres: PostgresServer
    database_host: Host
    dsn: str
    root: Path
    nodes: list[LabNode] = field(default_factory=list)
    proxies: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    clients: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """How to stop the test's clients (a failed test leaves them running)."""

    def start_nodes(self, count: int, *, dsn: str | None = None, **extra_env: str) -> list[LabNode]:
        """``count`` nodes, each on a host of its own, started side by side."""
        made: list[LabNode] = []
        for _ in range(count):
            name = f"n{len(self.nodes) + 1}"
            host = self.lab.add_host(name)
            home = self.root / name
            home.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
            env.update(LAB_CLUSTER)
            env.update({"CONVSVC_DATABASE_URL": dsn or self.dsn, **extra_env})
            process = ServerProcess(
                home / "data", env, listen=f"{host.address}:{NODE_PORT}", wrapper=host.command()
            )
            node = LabNode(name, host, process)
            self.nodes.append(node)
            made.append(node)
        with ThreadPoolExecutor(count) as starting:
            list(starting.map(lambda node: node.process.start(), made))
        return made

    def start_worker(self, node: LabNode, worker_id: str) -> subprocess.Popen[bytes]:
        """An echo agent worker on ``node``'s host (its namespace), attached to it: cut off
        with it."""
        log = (self.root / f"{worker_id}.log").open("ab")
        worker = subprocess.Popen(
            node.host.command(
                sys.executable,
                "-m",
                "convworker",
                "--address",
                node.address,
                "--worker-id",
                worker_id,
                "--workspace-root",
                str(self.root / f"{worker_id}-work"),
                "--kind",
                "worker-echo",
            ),
            env={k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(worker)
        return worker

    def slow_link_dsn(self, *, delay: float, loss: float, seed: int) -> str:
        """A DSN through a proxy beside PostgreSQL that delays and loses (see proxy.py)."""
        listen = f"{self.database_host.address}:{PROXY_PORT + len(self.proxies)}"
        proxy = subprocess.Popen(
            self.database_host.command(
                sys.executable,
                "-m",
                "tests.partitions.proxy",
                "--listen",
                listen,
                "--target",
                f"{self.database_host.address}:{self.postgres.port}",
                "--delay",
                str(delay),
                "--loss",
                str(loss),
                "--seed",
                str(seed),
            ),
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parents[2],
        )
        assert proxy.stdout is not None
        assert proxy.stdout.readline().strip() == b"listening"
        self.proxies.append(proxy)
        return self.dsn.replace(f"{self.database_host.address}:{self.postgres.port}", listen)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab.create() as made:
        yield made


@pytest.fixture
async def lab_cluster(lab: Lab, request: pytest.FixtureRequest) -> AsyncIterator[LabCluster]:
    """PostgreSQL in its own namespace, a fresh database; nodes are started by the test."""
    database_host = lab.add_host("pg")
    root = Path(tempfile.mkdtemp(prefix="convsvc-lab-"))
    os.chmod(root, 0o755)
    postgres = PostgresServer(
        postgres_bin_dir(),
        root / "pg",
        5432,
        host=database_host.address,
        wrapper=tuple(database_host.command()),
    )
    (root / "pg").mkdir()
    os.chmod(root / "pg", 0o755)
    group = LabCluster(lab, postgres, database_host, "", root)
    try:
        postgres.init()
        postgres.start()
        group.dsn = postgres.create_database()
        yield group
    finally:
        for stop_clients in group.clients:
            await stop_clients()
        logs = ARTIFACTS / "logs" / request.node.name
        logs.mkdir(parents=True, exist_ok=True)
        for node in group.nodes:
            if node.channel is not None:
                await node.channel.close()
            process = node.process.process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
            (logs / f"{node.name}.log").write_text(node.logs())  # for a failed run's reader
        for process in (*group.workers, *group.proxies):
            process.kill()
            process.wait(10)
        with contextlib.suppress(subprocess.CalledProcessError):
            postgres.crash()
        shutil.rmtree(root, ignore_errors=True)
