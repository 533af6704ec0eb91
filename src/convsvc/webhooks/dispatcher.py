"""Sends the outbox's deliveries: each signed as a Standard Webhooks message (the
``standardwebhooks`` library), retried on the configured schedule when the endpoint fails,
refuses or does not answer in time, and dead after the last attempt. Every node runs one; a
delivery is leased by one node at a time, so a cluster sends each once (again only when the
node that held it went quiet past its lease)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import httpx
import structlog
from standardwebhooks.webhooks import Webhook

from convsvc.config import WebhookConfig
from convsvc.domain import DeliveryState, Event, WebhookDelivery, WebhookEndpoint
from convsvc.errors import ConvsvcError
from convsvc.storage import ConversationStore, StorageError
from convsvc.webhooks.targets import check_target

log = structlog.get_logger(__name__)

_ERROR_CHARS = 300


class WebhookDispatcher:
    def __init__(self, store: ConversationStore, config: WebhookConfig, node: str) -> None:
        self._store = store
        self._config = config
        self._node = node
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._has_endpoints = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        # Redirects are not followed: an endpoint could otherwise send us anywhere.
        self._http = httpx.AsyncClient(
            timeout=self._config.timeout_seconds, follow_redirects=False, trust_env=False
        )
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def on_commit(self, events: Sequence[Event]) -> None:
        """A commit that logged an agent state may have added deliveries: look now (only
        when endpoints exist; others are found at the next poll)."""
        if self._has_endpoints and any(e.name == "agent_state_changed" for e in events):
            self._wake.set()

    async def _run(self) -> None:
        while True:
            claimed: list[tuple[WebhookDelivery, WebhookEndpoint]] = []
            try:
                # Endpoints come and go on any node: looked at each round.
                self._has_endpoints = bool(await self._store.list_webhooks())
                if self._has_endpoints:
                    claimed = await self._store.claim_deliveries(
                        self._node, self._config.concurrency, self._config.lease_seconds
                    )
            except StorageError as exc:
                log.warning("webhooks.claim_failed", error=str(exc))
            except Exception:
                # Whatever went wrong, the outbox keeps the deliveries: try again later.
                log.exception("webhooks.round_failed")
            if claimed:
                await asyncio.gather(*(self._attempt(d, e) for d, e in claimed))
                continue  # more may be due
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.poll_interval_seconds)

    async def _attempt(self, delivery: WebhookDelivery, endpoint: WebhookEndpoint) -> None:
        status, error = 0, ""
        try:
            await check_target(endpoint.url, self._config.allow_private_targets)
            status = await self._post(delivery, endpoint)
            if not 200 <= status < 300:
                error = f"the endpoint answered HTTP {status}"
        except ConvsvcError as exc:
            error = exc.message
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS] or type(exc).__name__
        except Exception as exc:
            # A bug must cost this attempt, not the dispatcher (nor the other deliveries).
            log.exception("webhooks.attempt_failed", delivery_id=delivery.delivery_id)
            error = f"the attempt failed: {type(exc).__name__}"
        attempts = delivery.attempts + 1
        schedule = self._config.retry_schedule_seconds
        if not error:
            state, next_time = DeliveryState.DELIVERED, None
        elif attempts > len(schedule):
            state, next_time = DeliveryState.DEAD, None
            log.warning(
                "webhooks.dead",
                delivery_id=delivery.delivery_id,
                webhook_id=endpoint.webhook_id,
                attempts=attempts,
                error=error,
            )
        else:
            state = DeliveryState.PENDING
            next_time = datetime.now(UTC) + timedelta(seconds=schedule[attempts - 1])
        try:
            await self._store.finish_attempt(
                delivery.delivery_id, self._node, state, status, error, next_time
            )
        except StorageError as exc:
            # The lease runs out and the delivery is sent again: at least once.
            log.warning("webhooks.finish_failed", delivery_id=delivery.delivery_id, error=str(exc))

    async def _post(self, delivery: WebhookDelivery, endpoint: WebhookEndpoint) -> int:
        assert self._http is not None
        body = _body(delivery)
        now = datetime.now(UTC)
        signature = Webhook(endpoint.secret).sign(delivery.delivery_id, now, body)
        response = await self._http.post(
            endpoint.url,
            content=body.encode(),
            headers={
                "content-type": "application/json",
                "webhook-id": delivery.delivery_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signature,
                "user-agent": "convsvc-webhooks",
            },
        )
        return int(response.status_code)


def _body(delivery: WebhookDelivery) -> str:
    return json.dumps(delivery.payload, separators=(",", ":"))
