"""Where a webhook may point: an http(s) URL whose host resolves only to public addresses,
unless the operator allows private ones. Checked when an endpoint is registered and again
before each attempt (a name may resolve elsewhere by then)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from convsvc.errors import InvalidArgument
from convsvc.validation import shown

MAX_URL = 2048


def check_url(url: str) -> str:
    """The URL, if it is an absolute http(s) URL with a host."""
    parts = urlsplit(url)
    if len(url) > MAX_URL or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(
            f"url {shown(url, 80)!r} is not an http or https URL with a host",
            reason="INVALID_WEBHOOK_URL",
            metadata={"field": "url"},
        )
    if parts.username or parts.password:
        raise InvalidArgument(
            "url must not carry credentials; endpoints verify the signature instead",
            reason="INVALID_WEBHOOK_URL",
            metadata={"field": "url"},
        )
    return url


async def check_target(url: str, allow_private: bool) -> None:
    """Raises InvalidArgument (WEBHOOK_TARGET_NOT_ALLOWED, WEBHOOK_TARGET_UNRESOLVED) unless
    every address the URL's host resolves to may be called."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidArgument(
            f"the webhook host {shown(host)!r} does not resolve ({exc})",
            reason="WEBHOOK_TARGET_UNRESOLVED",
            metadata={"field": "url"},
        ) from None
    if allow_private:
        return
    for *_, address in found:
        ip = ipaddress.ip_address(address[0])
        if not ip.is_global:
            raise InvalidArgument(
                f"the webhook host {shown(host)!r} resolves to {ip}, a loopback, link-local or "
                "private address; the operator may allow those "
                "(CONVSVC_WEBHOOKS__ALLOW_PRIVATE_TARGETS)",
                reason="WEBHOOK_TARGET_NOT_ALLOWED",
                metadata={"field": "url", "address": str(ip)},
            )
