"""Registering webhook endpoints (CreateWebhook, configuration), and reading them and their
deliveries: the checks a caller's input gets, secrets made, pages of deliveries."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import structlog

from convsvc import validation
from convsvc.config import WebhookConfig
from convsvc.domain import DeliveryQuery, DeliveryState, WebhookDelivery, WebhookEndpoint
from convsvc.domain import WebhookEventType as EventType
from convsvc.errors import InvalidArgument
from convsvc.paging import decode_token, encode_token
from convsvc.storage import ConversationStore
from convsvc.webhooks.targets import check_target, check_url

log = structlog.get_logger(__name__)

MAX_DESCRIPTION = 512


def new_secret() -> str:
    """A Standard Webhooks signing secret: "whsec_" and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _check_secret(secret: str) -> str:
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        key = b""
    if len(key) < 24:
        raise InvalidArgument(
            'secret must be "whsec_" and at least 24 bytes in base64 (or empty: one is made)',
            reason="INVALID_WEBHOOK_SECRET",
            metadata={"field": "secret"},
        )
    return secret


class WebhookEndpoints:
    def __init__(self, store: ConversationStore, config: WebhookConfig) -> None:
        self._store = store
        self._config = config

    async def create(
        self,
        *,
        url: str,
        event_types: Iterable[EventType] = (),
        description: str = "",
        secret: str = "",
        webhook_id: str = "",
    ) -> WebhookEndpoint:
        """Registers an endpoint (replacing the one with ``webhook_id``, if any)."""
        url = check_url(url)
        if len(description) > MAX_DESCRIPTION:
            raise InvalidArgument(
                f"description has {len(description)} characters; at most {MAX_DESCRIPTION}",
                reason="INVALID_ARGUMENT",
                metadata={"field": "description"},
            )
        await check_target(url, self._config.allow_private_targets)
        endpoint = WebhookEndpoint(
            webhook_id=validation.check_optional_id("webhook_id", webhook_id)
            or f"wh_{uuid.uuid4().hex}",
            url=url,
            event_types=tuple(sorted(set(event_types))),
            secret=_check_secret(secret) if secret else new_secret(),
            description=description,
            create_time=datetime.now(UTC),
        )
        await self._store.save_webhook(endpoint)
        return endpoint

    async def register_configured(self) -> None:
        """The endpoints of the configuration, each under an id its URL gives it."""
        for configured in self._config.endpoints:
            webhook_id = "cfg_" + hashlib.sha256(configured.url.encode()).hexdigest()[:16]
            secret = configured.secret.get_secret_value() if configured.secret else ""
            await self.create(
                url=configured.url,
                event_types=configured.event_types,
                description=configured.description,
                secret=secret or await self._kept_secret(webhook_id),
                webhook_id=webhook_id,
            )
            if not secret:
                log.info("webhooks.configured", webhook_id=webhook_id, url=configured.url)

    async def _kept_secret(self, webhook_id: str) -> str:
        """The secret made for a configured endpoint before (kept across restarts)."""
        for endpoint in await self._store.list_webhooks():
            if endpoint.webhook_id == webhook_id:
                return endpoint.secret
        return ""

    async def all(self) -> list[WebhookEndpoint]:
        return await self._store.list_webhooks()

    async def delete(self, webhook_id: str) -> bool:
        return await self._store.delete_webhook(validation.check_id("webhook_id", webhook_id))

    async def deliveries(
        self,
        *,
        webhook_id: str = "",
        conversation_id: str = "",
        states: Iterable[DeliveryState] = (),
        page_size: int = 0,
        page_token: str = "",
        default_page_size: int = 100,
        max_page_size: int = 1000,
    ) -> tuple[list[WebhookDelivery], str]:
        """Deliveries that match, newest first, one page at a time."""
        query = DeliveryQuery(
            webhook_id=validation.check_optional_id("webhook_id", webhook_id) or "",
            conversation_id=validation.check_optional_id("conversation_id", conversation_id) or "",
            states=frozenset(states),
            limit=validation.check_page_size(page_size, default_page_size, max_page_size),
        )
        fingerprint = [
            "deliveries",
            query.webhook_id,
            query.conversation_id,
            sorted(s.value for s in query.states),
            query.limit,
        ]
        key = self._store.page_token_key
        if page_token:
            moment, _, last = decode_token(key, page_token, fingerprint, str).partition("|")
            query = dataclasses.replace(query, after=(datetime.fromisoformat(moment), last))
        found = await self._store.list_deliveries(
            dataclasses.replace(query, limit=query.limit + 1)  # one more: is there a next page?
        )
        page = found[: query.limit]
        token = ""
        if len(found) > query.limit:
            last_delivery = page[-1]
            token = encode_token(
                key,
                fingerprint,
                f"{last_delivery.create_time.isoformat()}|{last_delivery.delivery_id}",
            )
        return page, token
