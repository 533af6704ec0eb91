"""Opaque, tamper-evident page tokens (AIP-158) bound to the query that produced them.

A token is the page position and a digest of the query, signed with HMAC-SHA256 under the
store's own key: a token that was not issued by this store (forged, edited or truncated) is
refused before anything in it is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any, TypeVar

from convsvc.errors import InvalidArgument

P = TypeVar("P", int, str)

MAX_TOKEN_CHARS = 1024
_MAC_BYTES = 16
_INT64_MAX = 2**63 - 1


def _query_key(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_token(key: bytes, query: Any, position: int | str) -> str:
    """A token for the page that starts at ``position`` of ``query``."""
    body = json.dumps({"q": _query_key(query), "p": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(_mac(key, body) + body).decode().rstrip("=")


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_PAGE_TOKEN", metadata={"field": "page_token"})


def decode_token(key: bytes, token: str, query: Any, kind: type[P]) -> P:
    """The position a token names; it must have been issued for the same query."""
    not_ours = _invalid(
        "page_token is not a token this service issued; omit it to start from the first page"
    )
    if len(token) > MAX_TOKEN_CHARS:
        raise not_ours
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, binascii.Error):
        raise not_ours from None
    mac, body = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
    if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, _mac(key, body)):
        raise not_ours
    data = json.loads(body)  # signed by us: well formed
    if data["q"] != _query_key(query):
        raise _invalid(
            "page_token belongs to a request with other arguments; repeat them unchanged"
        )
    position = data["p"]
    if not isinstance(position, kind) or isinstance(position, bool):
        raise not_ours
    if isinstance(position, int) and not 0 <= position <= _INT64_MAX:
        raise not_ours
    return position
