"""When a long-lived stream (events, watch) breaks: which failures to resume after, and how
long to keep trying before giving up."""

from __future__ import annotations

import asyncio
import time

import grpc

from convclient.errors import ServiceUnavailableError

# The service went away or is shutting down (UNAVAILABLE), dropped the stream for falling
# behind (RESOURCE_EXHAUSTED), or cancelled it (CANCELLED: a call a server accepted just
# before it stopped is cancelled by the stop; this client's own cancellation is no error):
# the stream resumes where it was.
RESUMABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}
_FIRST_DELAY = 0.1
_MAX_DELAY = 2.0


class Reconnects:
    """Backs off between attempts; gives up ``give_up_after`` seconds into a run of failures."""

    def __init__(self, what: str, address: str, give_up_after: float) -> None:
        self._what = what
        self._address = address
        self._give_up_after = give_up_after
        self._failing_since: float | None = None
        self._delay = _FIRST_DELAY

    def succeeded(self) -> None:
        self._failing_since, self._delay = None, _FIRST_DELAY

    def next_delay(self, failure: grpc.RpcError | None) -> float:
        """How long to wait before the next attempt; raises once it is time to give up."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= self._give_up_after:
            details = getattr(failure, "details", None)
            cause = f": {details()}" if callable(details) else ""
            raise ServiceUnavailableError(
                f"lost {self._what} at {self._address} and could not resume it within "
                f"{self._give_up_after:g} s{cause}",
                code=grpc.StatusCode.UNAVAILABLE,
                reason="STREAM_LOST",
            )
        delay = self._delay
        self._delay = min(self._delay * 2, _MAX_DELAY)
        return delay

    async def wait(self, failure: grpc.RpcError | None) -> None:
        await asyncio.sleep(self.next_delay(failure))  # back off before reconnecting

    def wait_blocking(self, failure: grpc.RpcError | None) -> None:
        time.sleep(self.next_delay(failure))
