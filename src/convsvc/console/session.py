"""The console's login: the operator's convsvc token, kept in an HttpOnly, SameSite=Strict
cookie (never in a URL, never readable by the page's scripts), and a CSRF token every action
must echo in a header (a keyed hash of the session, so the server keeps no session state)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request
from starlette.responses import Response

SESSION_COOKIE = "convsvc_console"
CSRF_HEADER = "x-csrf-token"
NO_AUTH = "-"
"""The session value when convsvc runs without auth (no token to hold)."""


class Sessions:
    """Issues and checks console sessions."""

    def __init__(self, *, auth_required: bool, secure_cookie: bool) -> None:
        self.auth_required = auth_required
        self._secure = secure_cookie
        self._key = secrets.token_bytes(32)
        """Signs CSRF tokens; a restart logs nobody out but asks pages to reload."""

    def token(self, request: Request) -> str | None:
        """The caller's convsvc token (None without auth); raises LookupError when the
        request carries no session."""
        value = request.cookies.get(SESSION_COOKIE)
        if not value:
            if self.auth_required:
                raise LookupError("not logged in")
            return None
        return None if value == NO_AUTH else value

    def csrf(self, request: Request) -> str:
        return self._csrf_of(request.cookies.get(SESSION_COOKIE) or NO_AUTH)

    def csrf_ok(self, request: Request) -> bool:
        given = request.headers.get(CSRF_HEADER, "")
        return bool(given) and hmac.compare_digest(given, self.csrf(request))

    def _csrf_of(self, session: str) -> str:
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    def log_in(self, response: Response, token: str | None) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            token or NO_AUTH,
            httponly=True,
            samesite="strict",
            secure=self._secure,
            path="/",
        )

    def log_out(self, response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/", samesite="strict", httponly=True)
