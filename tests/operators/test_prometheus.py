"""A real Prometheus (Debian's package; scripts/test installs it) scrapes convsvc on loopback,
and the metrics are read back through Prometheus' HTTP query API."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from convclient.structs import dict_to_struct
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    def __init__(self, root: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "the metrics test needs prometheus (apt-get install prometheus)"
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: convsvc\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.log = root / "prometheus.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address={self.address}",
                ],
                stdout=log,
                stderr=log,
            )

    def query(self, expression: str) -> list[dict[str, object]]:
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        result: list[dict[str, object]] = answer["data"]["result"]
        return result

    async def value_when(
        self, expression: str, holds: Callable[[float], bool], timeout: float = 60
    ) -> float:
        """The expression's value once ``holds`` is true of it. Prometheus scrapes every
        second and offers no notification: its query API is polled, with a deadline."""
        deadline = time.monotonic() + timeout
        seen: object = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                result = await asyncio.to_thread(self.query, expression)
            except OSError:
                result = []  # not listening yet
            if result:
                seen = float(result[0]["value"][1])  # type: ignore[index]
                if holds(seen):
                    return seen
            await asyncio.sleep(0.5)
        raise AssertionError(f"{expression} = {seen} after {timeout}s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        server = Prometheus(tmp_path, target)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def test_prometheus_scrapes_conversations_streams_calls_and_commits(
    server_process: Callable[..., ServerProcess], prometheus: Callable[[str], Prometheus]
) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    node = server_process(extra_args=["--metrics-listen", metrics])
    node.start()
    scraper = prometheus(metrics)
    async with grpc.aio.insecure_channel(node.address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        for cid in ("m1", "m2"):
            await stub.StartConversation(pb.StartConversationRequest(conversation_id=cid))
        stream = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="m1"))
        first = await stream.read()  # the stream is live
        assert first.events
        for n in range(5):
            await stub.SendEvent(
                pb.SendEventRequest(
                    conversation_id="m2",
                    event=dict_to_struct({"action": "message", "args": {"content": str(n)}}),
                )
            )
        await scraper.value_when('convsvc_conversations{status="running"}', lambda v: v == 2)
        await scraper.value_when("convsvc_stream_subscribers", lambda v: v == 1)
        await scraper.value_when(
            'sum(convsvc_rpc_calls_total{method="SendEvent",code="OK"})', lambda v: v == 5
        )
        await scraper.value_when(
            'convsvc_commit_batch_events_count{backend="sqlite"}', lambda v: v >= 1
        )
        await scraper.value_when("convsvc_workers", lambda v: v == 0)
        watch = stub.WatchConversations(pb.WatchConversationsRequest())
        await watch.read()  # the snapshot: the watch is live
        await scraper.value_when("convsvc_watchers", lambda v: v == 1)
        await scraper.value_when("convsvc_queued_starts", lambda v: v == 0)
        watch.cancel()
        stream.cancel()
        await stub.CloseConversation(pb.CloseConversationRequest(conversation_id="m1"))
        await scraper.value_when('convsvc_conversations{status="running"}', lambda v: v == 1)
        await scraper.value_when("convsvc_stream_subscribers", lambda v: v == 0)
