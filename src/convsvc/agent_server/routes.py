"""The agent-server API's HTTP routes (OpenHands agent-server 1.58.2's paths, parameters and
answers), each a thin translation onto :class:`Conversations`.

Routes of that version this server does not serve answer 501 with the route and the reason
(``UNSUPPORTED``), never a silent 404.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from convsvc.agent_server import records
from convsvc.agent_server.conversations import Conversations, parse_id
from convsvc.web.loopback import ApiError

API_VERSION = "1.58.2"
"""The agent-server release whose API this serves."""
SUCCESS = {"success": True}

Handler = Callable[[Request], Awaitable[Response]]

UNSUPPORTED = {
    "/api/conversations/{conversation_id}/goal": "goal loops run inside the SDK's server",
    "/api/conversations/{conversation_id}/goal/stop": "goal loops run inside the SDK's server",
    "/api/conversations/{conversation_id}/goal/resume": "goal loops run inside the SDK's server",
    "/api/conversations/{conversation_id}/secrets": (
        "secrets are given at creation; updating them on a worker is not wired yet"
    ),
    "/api/conversations/{conversation_id}/confirmation_policy": (
        "the confirmation policy is given at creation (agent spec)"
    ),
    "/api/conversations/{conversation_id}/security_analyzer": (
        "the security analyzer is given at creation (agent spec)"
    ),
    "/api/conversations/{conversation_id}/switch_profile": "LLM profiles live on stock servers",
    "/api/conversations/{conversation_id}/switch_llm": "switching the LLM is not wired yet",
    "/api/conversations/{conversation_id}/load_plugin": "plugins are given at creation",
    "/api/conversations/{conversation_id}/ask_agent": "not wired yet",
    "/api/conversations/{conversation_id}/condense": "not wired yet",
    "/api/conversations/{conversation_id}/fork": "use convsvc's ForkConversation (gRPC)",
    "/api/conversations/{conversation_id}/agent_final_response": "not wired yet",
    "/api/conversations/{conversation_id}/children": "child conversations are not wired yet",
    "/api/conversations/{conversation_id}/navigate": "not wired yet",
    "/api/conversations/{conversation_id}/switch_acp_model": "ACP agents are not served",
    "/api/conversations/{conversation_id}/runtime": (
        "the runtime is convsvc's worker; GET /api/conversations/{id} tells its state"
    ),
    "/api/conversations/{conversation_id}/runtime/reprovision": "see .../runtime",
    "/api/bash/{path:path}": (
        "shell and file routes act on a sandbox: convsvc's workers host the workspace, and "
        "the SDK's terminal and file tools reach it through the agent"
    ),
    "/api/file/{path:path}": "see /api/bash",
    "/api/git/{path:path}": "see /api/bash",
    "/api/vscode/{path:path}": "see /api/bash",
}


def _detail(status: int, detail: str, reason: str = "") -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=status)


def session_key(request: Request) -> str | None:
    return request.headers.get("x-session-api-key")


def _answers(handler: Handler) -> Handler:
    """Turns convsvc's errors into the API's JSON errors (401 as stock words it)."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as error:
            if error.status == 401:
                return _detail(401, "Unauthorized")
            return _detail(error.status, error.detail, error.reason)

    return wrapped


MAX_BODY_BYTES = 4 * 1024 * 1024
"""The largest request body read (a conversation's request with its agent spec fits many
times over); beyond it the API answers 413 without reading on."""


async def _json_object(request: Request) -> dict[str, Any]:
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body exceeds {MAX_BODY_BYTES} bytes", "BODY_TOO_LARGE")
    try:
        body = json.loads(received)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(422, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object")
    return body


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(422, f"{name} must be between {low} and {high}")
    return value


def _time(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return records.server_time(datetime.fromisoformat(raw.replace("Z", "+00:00")))
    except ValueError:
        raise ApiError(422, f"{name} must be an ISO 8601 datetime") from None


def _status(request: Request) -> str | None:
    status = request.query_params.get("status")
    if status is not None and status not in records.EXECUTION_STATUSES:
        raise ApiError(422, f"status must be one of {sorted(records.EXECUTION_STATUSES)}")
    return status


def _cid(request: Request) -> str:
    return parse_id(request.path_params["conversation_id"])


class Routes:
    """The routes, bound to the operations."""

    def __init__(self, conversations: Conversations) -> None:
        self.c = conversations
        self.started = time.monotonic()

    def table(self) -> list[Route]:
        c = "/api/conversations"
        cid = c + "/{conversation_id}"
        routes = [
            Route("/alive", self.alive, methods=["GET"]),
            Route("/health", self.alive, methods=["GET"]),
            Route("/ready", self.alive, methods=["GET"]),
            Route("/server_info", self.server_info, methods=["GET"]),
            Route(c + "/search", _answers(self.search), methods=["GET"]),
            Route(c + "/count", _answers(self.count), methods=["GET"]),
            Route(c, _answers(self.create), methods=["POST"]),
            Route(c, _answers(self.batch_get), methods=["GET"]),
            Route(cid + "/events/search", _answers(self.search_events), methods=["GET"]),
            Route(cid + "/events/count", _answers(self.count_events), methods=["GET"]),
            Route(
                cid + "/events/respond_to_confirmation", _answers(self.confirm), methods=["POST"]
            ),
            Route(cid + "/events/{event_id}", _answers(self.get_event), methods=["GET"]),
            Route(cid + "/events", _answers(self.send_message), methods=["POST"]),
            Route(cid + "/events", _answers(self.batch_get_events), methods=["GET"]),
            Route(cid + "/run", _answers(self.run), methods=["POST"]),
            Route(cid + "/pause", _answers(self.pause), methods=["POST"]),
            Route(cid + "/interrupt", _answers(self.interrupt), methods=["POST"]),
            Route(cid, _answers(self.get), methods=["GET"]),
            Route(cid, _answers(self.delete), methods=["DELETE"]),
        ]
        every = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        routes += [
            Route(path, _unsupported(path, why), methods=every) for path, why in UNSUPPORTED.items()
        ]
        routes += [
            # Updating a conversation's title or tags.
            Route(
                cid, _unsupported(cid, "updating title or tags is not wired yet"), methods=["PATCH"]
            ),
            # The agent-server's server-level routes (settings, profiles, skills, tools, MCP...)
            # belong to a stock server's own disk and processes.
            Route(
                "/api/{path:path}",
                _unsupported("/api/...", "this agent-server route is not served"),
                methods=every,
            ),
        ]
        return routes

    async def alive(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def server_info(self, request: Request) -> Response:
        uptime = time.monotonic() - self.started
        return JSONResponse(
            {
                "uptime": uptime,
                "idle_time": uptime,
                "title": "convsvc (OpenHands agent-server API)",
                "version": API_VERSION,
                "sdk_version": API_VERSION,
                "tools_version": API_VERSION,
                "conversation_runtime": "convsvc",
                "capabilities": ["idempotent_conversation_create_v1"],
            }
        )

    # -- conversations -----------------------------------------------------------------------

    async def search(self, request: Request) -> Response:
        sort = request.query_params.get("sort_order", "CREATED_AT_DESC")
        if sort != "CREATED_AT_DESC":
            raise ApiError(422, "only sort_order=CREATED_AT_DESC is served")
        page = await self.c.search(
            session_key(request),
            page_id=request.query_params.get("page_id"),
            limit=_int(request, "limit", 100, 1, 100),
            status=_status(request),
        )
        return JSONResponse(page)

    async def count(self, request: Request) -> Response:
        return JSONResponse(await self.c.count(session_key(request), _status(request)))

    async def create(self, request: Request) -> Response:
        info, new = await self.c.create(session_key(request), await _json_object(request))
        return JSONResponse(info, status_code=201 if new else 200)

    async def batch_get(self, request: Request) -> Response:
        ids = request.query_params.getlist("ids")
        if len(ids) > 99:
            raise ApiError(422, "ids: at most 99")
        key = session_key(request)
        found: list[Any] = []
        for raw in ids:
            try:
                found.append(await self.c.info(key, await self.c.get(key, parse_id(raw))))
            except ApiError as error:
                if error.status != 404:
                    raise
                found.append(None)
        return JSONResponse(found)

    async def get(self, request: Request) -> Response:
        key = session_key(request)
        return JSONResponse(await self.c.info(key, await self.c.get(key, _cid(request))))

    async def delete(self, request: Request) -> Response:
        await self.c.delete(session_key(request), _cid(request))
        return JSONResponse(SUCCESS)

    async def run(self, request: Request) -> Response:
        await self.c.run(session_key(request), _cid(request))
        return JSONResponse(SUCCESS)

    async def pause(self, request: Request) -> Response:
        await self.c.control(session_key(request), _cid(request), "pause")
        return JSONResponse(SUCCESS)

    async def interrupt(self, request: Request) -> Response:
        await self.c.control(session_key(request), _cid(request), "interrupt")
        return JSONResponse(SUCCESS)

    # -- events ------------------------------------------------------------------------------

    async def _events(self, request: Request) -> list[dict[str, Any]]:
        key = session_key(request)
        cid = _cid(request)
        await self.c.get(key, cid)
        return await self.c.sdk_events(key, cid)

    async def search_events(self, request: Request) -> Response:
        limit = _int(request, "limit", 100, 1, 100)
        sort = request.query_params.get("sort_order", "TIMESTAMP")
        if sort not in ("TIMESTAMP", "TIMESTAMP_DESC"):
            raise ApiError(422, "sort_order must be TIMESTAMP or TIMESTAMP_DESC")
        filters = self._filters(request)
        events = await self._events(request)
        if sort == "TIMESTAMP_DESC":
            events.reverse()
        start = 0
        page_id = request.query_params.get("page_id")
        if page_id:
            # An unknown page id starts from the beginning, as stock does.
            start = next((i for i, e in enumerate(events) if e.get("id") == page_id), 0)
        items: list[dict[str, Any]] = []
        next_page_id = None
        for event in events[start:]:
            if not records.matches(event, **filters):
                continue
            if len(items) >= limit:
                next_page_id = event.get("id")
                break
            items.append(event)
        return JSONResponse({"items": items, "next_page_id": next_page_id})

    def _filters(self, request: Request) -> dict[str, Any]:
        params = request.query_params
        return {
            "kind": params.get("kind"),
            "source": params.get("source"),
            "body": params.get("body"),
            "timestamp_gte": _time(request, "timestamp__gte"),
            "timestamp_lt": _time(request, "timestamp__lt"),
        }

    async def count_events(self, request: Request) -> Response:
        filters = self._filters(request)
        events = await self._events(request)
        return JSONResponse(sum(1 for e in events if records.matches(e, **filters)))

    async def get_event(self, request: Request) -> Response:
        wanted = request.path_params["event_id"]
        for event in await self._events(request):
            if event.get("id") == wanted:
                return JSONResponse(event)
        raise ApiError(404, "Not Found")

    async def batch_get_events(self, request: Request) -> Response:
        wanted = request.query_params.getlist("event_ids")
        by_id = {e.get("id"): e for e in await self._events(request)}
        return JSONResponse([by_id.get(i) for i in wanted])

    async def send_message(self, request: Request) -> Response:
        await self.c.send_message(session_key(request), _cid(request), await _json_object(request))
        return JSONResponse(SUCCESS)

    async def confirm(self, request: Request) -> Response:
        await self.c.confirm(session_key(request), _cid(request), await _json_object(request))
        return JSONResponse(SUCCESS)


def _unsupported(path: str, why: str) -> Handler:
    async def answer(request: Request) -> Response:
        shown = request.url.path if path == "/api/..." else path
        return _detail(
            501, f"{request.method} {shown} is not served by convsvc: {why}", "UNSUPPORTED"
        )

    return answer
