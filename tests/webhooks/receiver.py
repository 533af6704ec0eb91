"""A real HTTP endpoint for webhook tests: it answers as told (a status, a delay, or not at
all when stopped), checks every message's Standard Webhooks signature as a receiver must, and
keeps what it got."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


@dataclass
class Received:
    delivery_id: str
    payload: dict[str, Any]
    signed: bool


@dataclass
class Receiver:
    port: int = 0
    status: int = 200
    delay: float = 0.0
    secret: str = ""
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if receiver.delay:
                    time.sleep(receiver.delay)  # a slow endpoint, on its own thread
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(receiver.secret).verify(body, headers)
                    signed = True
                except Exception:  # the library's verification error, or a missing header
                    signed = False
                with receiver._changed:
                    receiver.received.append(
                        Received(headers.get("webhook-id", ""), json.loads(body), signed)
                    )
                    receiver._changed.notify_all()
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    async def until(self, done: Any, timeout: float = 20.0) -> list[Received]:
        """What was received once ``done(received)`` holds."""

        def wait() -> list[Received]:
            with self._changed:
                if not self._changed.wait_for(lambda: done(self.received), timeout):
                    raise AssertionError(f"the endpoint got only {self.received}")
                return list(self.received)

        return await asyncio.to_thread(wait)


def types(received: list[Received]) -> list[str]:
    return [r.payload["type"] for r in received]
