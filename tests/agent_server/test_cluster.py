"""Clustered convsvc behind the agent-server API: any node serves the API for any
conversation, wherever its worker runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_server import sdk
from tests.agent_server.conftest import Backend, start_convsvc, start_worker
from tests.agent_server.fake_llm import SdkFakeLLM
from tests.agent_server.test_client_suite import all_events, socket_events
from tests.openhands.conftest import stop_process
from tests.postgres import PostgresServer, postgres_server

CLUSTER_ENV = {"CONVSVC_CLUSTER__HEARTBEAT_INTERVAL_SECONDS": "0.5"}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def advertised(server: PostgresServer, dsn: str, address: str, kind: str) -> None:
    """Waits until a node's heartbeat says its workers have room for ``kind``."""
    deadline = time.monotonic() + 60
    query = f"SELECT '{kind}' = ANY(agent_kinds) FROM nodes WHERE address = '{address}'"
    while time.monotonic() < deadline:
        found = subprocess.run(
            [str(server.bin_dir / "psql"), dsn, "-tAc", query],
            env={**os.environ, "PGPASSWORD": server.password},
            capture_output=True,
            text=True,
            check=False,
        )
        if found.stdout.strip() == "t":
            return
        time.sleep(0.2)  # the registry is a table: nothing to subscribe to
    raise AssertionError(f"{address} never advertised {kind}")


@pytest.fixture
def two_nodes(postgres: PostgresServer, tmp_path: Path) -> Iterator[tuple[Backend, Backend]]:
    """Two nodes on one database; the only openhands-sdk worker attaches to the first."""
    dsn = postgres.create_database()
    env = {**CLUSTER_ENV, "CONVSVC_DATABASE_URL": dsn}
    first, first_url = start_convsvc(tmp_path / "a", **env)
    second, second_url = start_convsvc(tmp_path / "b", **env)
    worker = start_worker(tmp_path, first.address, "worker-a")
    advertised(postgres, dsn, first.address, "openhands-sdk")
    yield Backend("node-a", first_url, convsvc=first), Backend("node-b", second_url, convsvc=second)
    stop_process(worker.process)
    second.stop()
    first.stop()


def test_any_node_serves_any_conversation(
    two_nodes: tuple[Backend, Backend], fake_llm: SdkFakeLLM, tmp_path: Path
) -> None:
    node_a, node_b = two_nodes
    # Created and driven through the node without a worker: it runs where the worker is.
    conversation, recorder = sdk.start(node_b, fake_llm, str(tmp_path), initial="run: echo one")
    try:
        recorder.wait_for(sdk.is_finish, "finish, seen through node b's socket")
        conversation.send_message("run: echo two")
        conversation.run()
        cid = str(conversation.id)
        through_b = all_events(node_b, cid)
        through_a = all_events(node_a, cid)
        assert [e["id"] for e in through_a] == [e["id"] for e in through_b]
        assert (
            sum(1 for e in through_b if e["kind"] == "ActionEvent" and e["tool_name"] == "finish")
            == 2
        )
        _, resent = asyncio.run(socket_events(node_a, cid, len(through_a), resend_mode="all"))
        assert [e["id"] for e in resent] == [e["id"] for e in through_a]
        with node_a.http() as http:
            assert http.get(f"/api/conversations/{cid}").json()["execution_status"] == "finished"
            assert http.delete(f"/api/conversations/{cid}").status_code == 200
        with node_b.http() as http:
            assert http.get(f"/api/conversations/{cid}").status_code == 404
    finally:
        conversation.close()
