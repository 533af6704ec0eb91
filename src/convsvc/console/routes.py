"""The console's HTTP routes: its page and static files, the login, JSON reads, server-sent
event streams (the watch, a conversation's events) and the actions, each a convsvc call made
with the operator's token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convclient import convert
from convsvc.console import views
from convsvc.console.session import Sessions
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.web.loopback import ApiError, Backend

STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEARTBEAT_SECONDS = 15.0
STATS_SECONDS = 2.0

Handler = Callable[[Request], Awaitable[Response]]
Stats = Callable[[], dict[str, Any]]

_ACTIONS = {
    "pause": pb.AGENT_CONTROL_PAUSE,
    "resume": pb.AGENT_CONTROL_RESUME,
    "interrupt": pb.AGENT_CONTROL_INTERRUPT,
}
_DECISIONS = {"approve": pb.APPROVAL_DECISION_APPROVE, "reject": pb.APPROVAL_DECISION_REJECT}


class _SecurityHeaders:
    """Adds the console's security headers to every HTTP response (a plain ASGI middleware:
    server-sent event streams pass through untouched)."""

    HEADERS = (
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        # same-origin: the page's own POSTs carry their Origin (no-referrer would send "null").
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name for name, _ in headers}
                headers += [h for h in self.HEADERS if h[0] not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class Console:
    """The console's handlers."""

    def __init__(self, backend: Backend, sessions: Sessions, stats: Stats) -> None:
        self.backend = backend
        self.sessions = sessions
        self.stats = stats

    def app(self) -> Starlette:
        api = "/console/api"
        cid = api + "/conversations/{conversation_id}"
        routes = [
            Route("/", lambda _: RedirectResponse("/console/", 303)),
            Route("/console/", self.page),
            Route("/console/login", self.login_page, methods=["GET"]),
            Route("/console/login", self.log_in, methods=["POST"]),
            Route("/console/logout", self._guarded(self.log_out), methods=["POST"]),
            Mount("/console/static", StaticFiles(directory=STATIC), name="static"),
            Route(api + "/session", self._reads(self.session)),
            Route(api + "/conversations", self._reads(self.conversations)),
            Route(api + "/watch", self._reads(self.watch)),
            Route(api + "/audit", self._reads(self.audit)),
            Route(api + "/workers", self._reads(self.workers)),
            Route(cid, self._reads(self.conversation)),
            Route(cid + "/events", self._reads(self.events)),
            Route(cid + "/stream", self._reads(self.stream)),
            Route(cid + "/{action}", self._guarded(self.act), methods=["POST"]),
        ]
        return Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)])

    # -- wrappers ----------------------------------------------------------------------------

    def _reads(self, handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                self.sessions.token(request)
            except LookupError:
                return JSONResponse({"detail": "log in first"}, status_code=401)
            return await _answered(handler, request)

        return wrapped

    def _guarded(self, handler: Handler) -> Handler:
        """Actions: a session, and the CSRF token in a header (a cross-site form cannot set
        one; SameSite=Strict already keeps the cookie off cross-site requests)."""

        async def wrapped(request: Request) -> Response:
            try:
                self.sessions.token(request)
            except LookupError:
                return JSONResponse({"detail": "log in first"}, status_code=401)
            if not _same_origin(request) or not self.sessions.csrf_ok(request):
                return JSONResponse(
                    {"detail": "missing or wrong CSRF token", "reason": "CSRF"}, status_code=403
                )
            return await _answered(handler, request)

        return wrapped

    def _key(self, request: Request) -> str | None:
        return self.sessions.token(request)

    # -- pages and login ---------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        try:
            self.sessions.token(request)
        except LookupError:
            return RedirectResponse("/console/login", 303)
        return FileResponse(STATIC / "index.html")

    async def login_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "login.html")

    async def log_in(self, request: Request) -> Response:
        if not _same_origin(request):
            # Another site posting its own token would log this browser in as someone else.
            return JSONResponse(
                {"detail": "cross-origin login refused", "reason": "CSRF"}, status_code=403
            )
        form = await request.form()
        token = str(form.get("token") or "").strip() or None
        if self.sessions.auth_required and not token:
            return RedirectResponse("/console/login?error=missing", 303)
        try:
            # Any read proves the token; what it may do is convsvc's to decide per call.
            await self.backend.call(
                "ListConversations", pb.ListConversationsRequest(page_size=1), token
            )
        except ApiError as error:
            reason = "refused" if error.status in (401, 403) else "unavailable"
            return RedirectResponse(f"/console/login?error={reason}", 303)
        response = RedirectResponse("/console/", 303)
        self.sessions.log_in(response, token)
        return response

    async def log_out(self, request: Request) -> Response:
        response = JSONResponse({"logged_out": True})
        self.sessions.log_out(response)
        return response

    async def session(self, request: Request) -> Response:
        return JSONResponse(
            {"csrf": self.sessions.csrf(request), "auth": self.sessions.auth_required}
        )

    # -- reads -------------------------------------------------------------------------------

    async def conversations(self, request: Request) -> Response:
        params = request.query_params
        labels = {}
        if params.get("label"):
            key, _, value = params["label"].partition("=")
            labels[key] = value
        response = await self.backend.call(
            "SearchConversations",
            pb.SearchConversationsRequest(
                user_id=params.get("user", ""),
                agent_states=[params["state"]] if params.get("state") else [],
                labels=labels,
                page_size=min(int(params.get("limit", "100") or 100), 1000),
                page_token=params.get("page_token", ""),
            ),
            self._key(request),
        )
        return JSONResponse(
            {
                "items": [views.conversation(c) for c in response.conversations],
                "next_page_token": response.next_page_token,
            }
        )

    async def conversation(self, request: Request) -> Response:
        response = await self.backend.call(
            "GetConversation",
            pb.GetConversationRequest(conversation_id=request.path_params["conversation_id"]),
            self._key(request),
        )
        return JSONResponse(views.conversation(response.conversation))

    async def events(self, request: Request) -> Response:
        """A page of older events, newest first, below ``before`` (exclusive)."""
        params = request.query_params
        before = params.get("before")
        request_ = pb.SearchEventsRequest(
            conversation_id=request.path_params["conversation_id"],
            reverse=True,
            page_size=min(int(params.get("limit", "50") or 50), 200),
        )
        if before is not None:
            if int(before) <= 0:
                return JSONResponse({"items": []})
            request_.end_id = int(before) - 1
        response = await self.backend.call("SearchEvents", request_, self._key(request))
        return JSONResponse({"items": [views.event(convert.event(e)) for e in response.events]})

    async def audit(self, request: Request) -> Response:
        params = request.query_params
        response = await self.backend.call(
            "ListAuditEntries",
            pb.ListAuditEntriesRequest(
                conversation_id=params.get("conversation_id", ""),
                user_id=params.get("user_id", ""),
                page_size=min(int(params.get("limit", "50") or 50), 500),
                page_token=params.get("page_token", ""),
            ),
            self._key(request),
        )
        return JSONResponse(
            {
                "items": [views.audit_entry(e) for e in response.entries],
                "next_page_token": response.next_page_token,
            }
        )

    async def workers(self, request: Request) -> Response:
        response = await self.backend.call(
            "ListWorkers", pb.ListWorkersRequest(), self._key(request)
        )
        return JSONResponse(
            {
                "workers": [views.worker(w) for w in response.workers],
                "nodes": [views.node(n) for n in response.nodes],
            }
        )

    # -- live streams (server-sent events) ---------------------------------------------------

    async def watch(self, request: Request) -> Response:
        key = self._key(request)

        async def changes() -> AsyncIterator[tuple[str, Any]]:
            async for message in self.backend.watch(key):
                if message.snapshot or message.snapshot_complete:
                    yield (
                        "snapshot",
                        {
                            "items": [
                                views.conversation(w.conversation, list(w.connection_ids))
                                for w in message.snapshot
                            ],
                            "complete": message.snapshot_complete,
                        },
                    )
                for found in message.changes:
                    yield "change", views.change(found)

        async def stats() -> AsyncIterator[tuple[str, Any]]:
            while True:
                yield "stats", self.stats()
                await asyncio.sleep(STATS_SECONDS)  # a sample rate, not a wait for an event

        return _sse(request, changes(), stats())

    async def stream(self, request: Request) -> Response:
        key = self._key(request)
        cid = request.path_params["conversation_id"]
        start = int(request.query_params.get("from", "0") or 0)

        async def events() -> AsyncIterator[tuple[str, Any]]:
            async for batch in self.backend.stream(cid, key, start):
                for found in batch.events:
                    yield "event", views.event(found)
                if batch.status_update:
                    yield "status", views.status_update(batch.status_update)

        return _sse(request, events())

    # -- actions -----------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        cid = request.path_params["conversation_id"]
        action = request.path_params["action"]
        key = self._key(request)
        if action == "close":
            await self.backend.call(
                "CloseConversation", pb.CloseConversationRequest(conversation_id=cid), key
            )
        elif action in _ACTIONS:
            await self.backend.call(
                "ControlAgent",
                pb.ControlAgentRequest(conversation_id=cid, control=_ACTIONS[action]),
                key,
            )
        elif action in _DECISIONS:
            body = await request.json()
            await self.backend.call(
                "ConfirmAction",
                pb.ConfirmActionRequest(
                    conversation_id=cid,
                    action_id=int(body.get("action_id", -1)),
                    decision=_DECISIONS[action],
                ),
                key,
            )
        else:
            return JSONResponse({"detail": f"no action {action!r}"}, status_code=404)
        return JSONResponse({"done": action})


def _same_origin(request: Request) -> bool:
    """Whether a state-changing request comes from the console's own pages: browsers send
    Origin with every POST, and it must name this host (a request without one is not a
    browser's cross-site request)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def _answered(handler: Handler, request: Request) -> Response:
    try:
        return await handler(request)
    except ApiError as error:
        body: dict[str, Any] = {"detail": error.detail}
        if error.reason:
            body["reason"] = error.reason
        return JSONResponse(body, status_code=error.status)
    except ValueError as error:
        return JSONResponse({"detail": str(error)}, status_code=422)


def _sse(request: Request, *sources: AsyncIterator[tuple[str, Any]]) -> StreamingResponse:
    """Merges the sources into one server-sent event stream, with heartbeats, until the
    browser goes away or a source ends (an error is sent as an ``error`` event)."""

    async def body() -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue(maxsize=1000)

        async def pump(source: AsyncIterator[tuple[str, Any]]) -> None:
            try:
                async for item in source:
                    await queue.put(item)
            except ApiError as error:
                await queue.put(("error", {"detail": error.detail, "status": error.status}))
            await queue.put(None)

        tasks = [asyncio.create_task(pump(source)) for source in sources]
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    yield ": heartbeat\n\n"
                    continue
                if item is None:
                    return
                kind, data = item
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )
