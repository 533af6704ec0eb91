"""Scoped tokens: signed, expiring credentials bound to one user, some or all of that user's
conversations and a set of permissions (JWTs, HS256, made and checked with PyJWT).

The signing key is the operator's (CONVSVC_TOKEN_SIGNING_KEY or ..._FILE) or, by default,
derived from the service token, so every node of a cluster that shares the service token
accepts the tokens any of them minted.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from convsvc.errors import InvalidArgument, Unauthenticated

ISSUER = "convsvc"
DEFAULT_TTL_SECONDS = 3600
_DERIVATION_LABEL = b"convsvc scoped token signing key v1"


class Permission(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class TokenScope:
    """What a verified token allows."""

    token_id: str
    user_id: str
    conversation_ids: frozenset[str]
    """Empty: all of the user's conversations."""
    permissions: frozenset[Permission]
    expire_time: datetime

    def allows_conversation(self, conversation_id: str) -> bool:
        return not self.conversation_ids or conversation_id in self.conversation_ids


def derived_signing_key(service_token: str) -> bytes:
    """A signing key of the service token's: knowing a scoped token reveals neither."""
    return hmac.new(service_token.encode(), _DERIVATION_LABEL, hashlib.sha256).digest()


class TokenAuthority:
    def __init__(self, key: bytes, max_ttl_seconds: float) -> None:
        self._key = key
        self.max_ttl_seconds = max_ttl_seconds

    def mint(
        self,
        user_id: str,
        conversation_ids: Iterable[str],
        permissions: Iterable[Permission],
        ttl_seconds: float,
        now: datetime | None = None,
    ) -> tuple[str, TokenScope]:
        ttl = ttl_seconds or DEFAULT_TTL_SECONDS
        if ttl < 0 or ttl > self.max_ttl_seconds:
            raise InvalidArgument(
                f"ttl_seconds must be between 1 and {self.max_ttl_seconds:g} (got {ttl_seconds:g})",
                reason="INVALID_ARGUMENT",
                metadata={"field": "ttl_seconds"},
            )
        issued = (now or datetime.now(UTC)).replace(microsecond=0)
        scope = TokenScope(
            token_id=uuid.uuid4().hex,
            user_id=user_id,
            conversation_ids=frozenset(conversation_ids),
            permissions=frozenset(permissions),
            expire_time=issued + timedelta(seconds=ttl),
        )
        claims = {
            "iss": ISSUER,
            "aud": ISSUER,
            "sub": scope.user_id,
            "jti": scope.token_id,
            "iat": issued,
            "exp": scope.expire_time,
            "cids": sorted(scope.conversation_ids),
            "perms": sorted(p.value for p in scope.permissions),
        }
        return jwt.encode(claims, self._key, algorithm="HS256"), scope

    def verify(self, token: str) -> TokenScope:
        """The scope of a token this service signed and that has not expired."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],  # never what the token's header claims
                audience=ISSUER,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "jti"]},
            )
            scope = TokenScope(
                token_id=str(claims["jti"]),
                user_id=str(claims["sub"]),
                conversation_ids=frozenset(str(c) for c in claims.get("cids", [])),
                permissions=frozenset(Permission(p) for p in claims.get("perms", [])),
                expire_time=datetime.fromtimestamp(int(claims["exp"]), UTC),
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                "the token has expired; ask for a new one", reason="TOKEN_EXPIRED"
            ) from None
        except (jwt.InvalidTokenError, ValueError, TypeError, KeyError):
            raise Unauthenticated(
                "the token is not one this service signed", reason="TOKEN_INVALID"
            ) from None
        return scope
