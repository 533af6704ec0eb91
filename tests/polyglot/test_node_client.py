"""The polyglot path: a Node.js client built from protos/ alone (@grpc/grpc-js and
@grpc/proto-loader from npm) drives a real `convsvc serve`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.polyglot.conftest import PROTOS


def test_node_client_drives_the_service(
    node_client: Path, server_process: Callable[..., Any]
) -> None:
    address = server_process().start()
    finished = subprocess.run(
        ["node", str(node_client), address, str(PROTOS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    steps = {line["step"]: line for line in map(json.loads, finished.stdout.splitlines())}

    assert steps["start"]["conversation_id"] == "node-demo"
    assert steps["join"]["connection_id"] == "node-conn"
    assert steps["stream"]["echo"] == "hello from node"
    ids = steps["stream"]["ids"]
    assert ids == list(range(len(ids)))
    assert steps["send"]["event_id"] in ids
    connect = steps["connect"]
    assert connect["opened"] == "node-connect"
    assert connect["echo"] == "hello over connect"
    [result] = connect["results"]
    assert result["request_id"] == "node-connect-1" and result["event_id"] in connect["ids"]
    assert connect["ids"] == list(range(connect["ids"][0], connect["ids"][-1] + 1))
    assert connect["status"] == "OK"
    assert steps["connections"]["ids"] == ["node-conn"]  # the Connect one left with its stream
    assert steps["list"]["conversations"] == [["node-demo", "CONVERSATION_STATUS_RUNNING"]]
    assert steps["close"]["status"] == "CONVERSATION_STATUS_STOPPED"
    watch = steps["watch"]
    assert watch["snapshot"] == []
    kinds = [kind.removeprefix("CONVERSATION_CHANGE_KIND_") for kind, _, _ in watch["changes"]]
    assert kinds[0] == "CREATED" and kinds[-1] == "CLOSED"
    assert {cid for _, cid, _ in watch["changes"]} == {"node-demo"}
    connection_counts = [
        n for kind, _, n in watch["changes"] if kind.endswith("CONNECTIONS_CHANGED")
    ]
    assert connection_counts == [1, 2, 1]  # node-conn joined, node-connect came and went
    assert steps["error"]["code"] == "NOT_FOUND"
    assert steps["error"]["info"] == {
        "reason": "CONVERSATION_NOT_FOUND",
        "domain": "convsvc.v1",
        "metadata": {"conversation_id": "no-such-conversation"},
    }
