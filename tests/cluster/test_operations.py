"""What an operator does: migrate the schema, keep the password in a file, read the logs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.conftest import FAST_CLUSTER, Node
from tests.conftest import CONVSVC_BIN, ServerProcess
from tests.postgres import PostgresServer


def run_convsvc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONVSVC_BIN), *args], capture_output=True, text=True, timeout=60, env=env
    )


async def test_migrate_creates_the_schema_once(postgres: PostgresServer) -> None:
    dsn = postgres.create_database()
    first = run_convsvc("migrate", "--database-url", dsn)
    assert first.returncode == 0, first.stderr
    assert "0001_cluster.sql" in first.stdout
    assert postgres.password not in first.stdout + first.stderr
    second = run_convsvc("migrate", "--database-url", dsn)
    assert second.returncode == 0 and "up to date" in second.stdout


async def test_migrate_without_a_database_explains_itself() -> None:
    missing = run_convsvc("migrate")
    assert missing.returncode == 2 and "CONVSVC_DATABASE_URL" in missing.stderr
    refused = run_convsvc("migrate", "--database-url", "postgresql://nobody@127.0.0.1:1/x")
    assert refused.returncode == 1 and "unreachable" in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_the_password_comes_from_a_file_and_is_never_logged(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    dsn = postgres.create_database(with_password=False)
    password_file = tmp_path / "db-password"
    password_file.write_text(postgres.password + "\n")
    env = {**FAST_CLUSTER, "CONVSVC_DATABASE_URL": dsn}
    process = ServerProcess(
        tmp_path / "data",
        {**_base_env(), **env},
        ["--database-password-file", str(password_file)],
    )
    process.start()
    node = Node(process)
    try:
        started = await node.stub.StartConversation(pb.StartConversationRequest(user_id="u"))
        assert started.conversation.conversation_id
    finally:
        if node.channel is not None:
            await node.channel.close()
        assert process.terminate() == 0
    logs = process.logs()
    assert "postgresql://postgres@127.0.0.1" in logs  # where it connected is shown...
    assert postgres.password not in logs  # ...never how


async def test_a_wrong_password_stops_the_node_with_a_clear_error(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    dsn = postgres.create_database(with_password=False)
    env = {
        **_base_env(),
        **FAST_CLUSTER,
        "CONVSVC_DATABASE_URL": dsn.replace("postgres@", "postgres:wrong@"),
    }
    failed = run_convsvc("serve", "--listen", "127.0.0.1:0", env=env)
    assert failed.returncode != 0
    assert "cannot start" in failed.stderr
    assert "password authentication failed" in failed.stderr
    assert "Traceback" not in failed.stderr and ":wrong@" not in failed.stderr


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
