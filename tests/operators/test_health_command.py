"""`convsvc health`, the check a container runtime or a script runs against a live server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONVSVC = Path(sys.executable).parent / "convsvc"


def health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONVSVC), "health", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


def test_a_serving_server_passes(server_process: Callable[..., Any]) -> None:
    address = server_process().start()
    checked = health("--address", address)
    assert checked.returncode == 0, checked.stderr
    assert "SERVING" in checked.stdout


def test_the_address_comes_from_the_listen_setting(server_process: Callable[..., Any]) -> None:
    port = server_process().start().rsplit(":", 1)[1]
    env = {**os.environ, "CONVSVC_LISTEN": f"0.0.0.0:{port}"}
    checked = health(env=env)
    assert checked.returncode == 0, checked.stderr


def test_no_server_fails_within_the_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    checked = health("--address", f"127.0.0.1:{free_port}", "--timeout", "2")
    assert checked.returncode == 1
    assert "UNAVAILABLE" in checked.stderr or "DEADLINE_EXCEEDED" in checked.stderr
