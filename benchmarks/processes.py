"""The processes a benchmark runs: servers (convsvc, the floor) and load generators."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CONVSVC = Path(sys.executable).parent / "convsvc"


class Server:
    """A server process started with a ready file (the bound address is written there)."""

    def __init__(self, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        ready = workdir / f"ready-{time.monotonic_ns()}"
        self.log_path = workdir / "server.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*argv, "--ready-file", str(ready)], env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)  # polling another process's start-up; no event to wait on
        self.address = ready.read_text().strip()

    def rss_kib(self) -> int:
        """Resident memory of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextmanager
def convsvc_server(**settings: str) -> Iterator[Server]:
    """`convsvc serve` on a fresh data directory, with ``CONVSVC_*`` settings."""
    with tempfile.TemporaryDirectory(prefix="convsvc-bench-") as tmp:
        workdir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
        env.update(
            {
                "CONVSVC_LOG_LEVEL": "WARNING",
                # Benchmarks run many conversations for one caller; OpenHands' limit is per user.
                "CONVSVC_ENGINE__MAX_CONCURRENT_CONVERSATIONS": "1000000",
                "CONVSVC_ENGINE__SUBSCRIBER_BUFFER_EVENTS": "1000000",
                "CONVSVC_ENGINE__SUBSCRIBER_BUFFER_BYTES": str(1024**3),
                # The catch-up scenario writes its log as one start's replay.
                "CONVSVC_ENGINE__MAX_REPLAY_EVENTS": "1000000",
                "CONVSVC_MAX_MESSAGE_BYTES": str(256 * 1024 * 1024),
                **{f"CONVSVC_{k.upper()}": v for k, v in settings.items()},
            }
        )
        server = Server(
            [str(CONVSVC), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(workdir / "data")],
            env,
            workdir,
        )
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def floor_server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="floor-bench-") as tmp:
        server = Server([sys.executable, "-m", "benchmarks.floor"], dict(os.environ), Path(tmp))
        try:
            yield server
        finally:
            server.stop()


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a load generator's coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    result: T = uvloop.run(coroutine)
    return result


def in_processes(function: Callable[..., T], argument_lists: list[tuple[Any, ...]]) -> list[T]:
    """Runs ``function(*arguments)`` in one fresh process per argument list, concurrently."""
    with ProcessPoolExecutor(len(argument_lists), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(function, *arguments) for arguments in argument_lists]
        return [future.result() for future in futures]


def in_process(function: Callable[..., T], *arguments: Any) -> T:
    return in_processes(function, [arguments])[0]
