"""The agent-server API's edge, on a real convsvc serving it over HTTP: what it answers before
any worker is involved (keys, malformed requests, unknown ids, routes it does not serve,
oversized bodies, a create no worker can take). Conversations on real openhands-sdk workers,
and the same client suite against a stock agent-server, are in tests/agent_server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from convsvc.agent_server import records
from convsvc.agent_server.routes import MAX_BODY_BYTES
from convsvc.app import ConvsvcApp
from tests.conftest import running_app

KEY = "agent-server-edge-test-key-0c1d2e"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[ConvsvcApp, httpx.AsyncClient]]:
    async with running_app(
        tmp_path / "data",
        auth_token=KEY,
        agent_server_listen="127.0.0.1:0",
        agent_server_start_timeout_seconds=1.0,
    ) as app:
        assert app.agent_server_address is not None
        async with httpx.AsyncClient(
            base_url=f"http://{app.agent_server_address}",
            headers={"X-Session-API-Key": KEY},
            timeout=30,
        ) as client:
            yield app, client


async def test_keys_are_checked_like_stock(api: tuple[ConvsvcApp, httpx.AsyncClient]) -> None:
    _, client = api
    assert (await client.get("/alive")).json() == {"status": "ok"}
    assert (await client.get("/server_info")).json()["version"] == "1.58.2"
    for key in ("wrong", ""):
        answer = await client.get("/api/conversations/search", headers={"X-Session-API-Key": key})
        assert answer.status_code == 401 and answer.json() == {"detail": "Unauthorized"}
    answer = await client.get("/api/conversations/search")
    assert answer.status_code == 200 and answer.json() == {"items": [], "next_page_id": None}
    assert (await client.get("/api/conversations/count")).json() == 0


async def test_bad_requests_get_precise_answers(api: tuple[ConvsvcApp, httpx.AsyncClient]) -> None:
    _, client = api
    not_json = await client.post("/api/conversations", content=b"{nope")
    assert not_json.status_code == 422 and "JSON object" in not_json.json()["detail"]
    a_list = await client.post("/api/conversations", json=[1, 2])
    assert a_list.status_code == 422
    no_agent = await client.post("/api/conversations", json={"workspace": {"working_dir": "x"}})
    assert no_agent.status_code == 422 and "agent" in no_agent.json()["detail"]
    bad_id = await client.post(
        "/api/conversations", json={"agent": {"kind": "Agent"}, "conversation_id": "not-a-uuid"}
    )
    assert bad_id.status_code == 422 and "UUID" in bad_id.json()["detail"]
    assert (await client.get("/api/conversations/not-a-uuid")).status_code == 422
    unknown = str(uuid.uuid4())
    for method, path in [
        ("GET", f"/api/conversations/{unknown}"),
        ("DELETE", f"/api/conversations/{unknown}"),
        ("POST", f"/api/conversations/{unknown}/run"),
        ("POST", f"/api/conversations/{unknown}/pause"),
        ("GET", f"/api/conversations/{unknown}/events/search"),
        ("GET", f"/api/conversations/{unknown}/events/count"),
    ]:
        answer = await client.request(method, path)
        assert answer.status_code == 404, (method, path, answer.text)
    limit = await client.get("/api/conversations/search", params={"limit": 500})
    assert limit.status_code == 422
    status = await client.get("/api/conversations/search", params={"status": "sleeping"})
    assert status.status_code == 422
    order = await client.get("/api/conversations/search", params={"sort_order": "UPDATED_AT"})
    assert order.status_code == 422


async def test_unserved_routes_say_so(api: tuple[ConvsvcApp, httpx.AsyncClient]) -> None:
    _, client = api
    cid = str(uuid.uuid4())
    for method, path, named in [
        ("POST", f"/api/conversations/{cid}/switch_llm", "switch_llm"),
        ("GET", f"/api/conversations/{cid}/runtime", "runtime"),
        ("PATCH", f"/api/conversations/{cid}", "title or tags"),
        ("POST", "/api/bash/start_bash_command", "/api/bash"),
        ("GET", "/api/file/download/etc/passwd", "/api/file"),
        ("GET", "/api/skills", "/api/skills"),
    ]:
        answer = await client.request(method, path)
        assert answer.status_code == 501, path
        assert answer.json()["reason"] == "UNSUPPORTED"
        assert named in answer.json()["detail"], answer.json()


async def test_an_oversized_body_is_refused(api: tuple[ConvsvcApp, httpx.AsyncClient]) -> None:
    _, client = api
    answer = await client.post(
        "/api/conversations", content=b'{"agent": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    )
    assert answer.status_code == 413 and answer.json()["reason"] == "BODY_TOO_LARGE"


async def test_a_create_no_worker_takes_answers_503(
    api: tuple[ConvsvcApp, httpx.AsyncClient],
) -> None:
    app, client = api
    cid = str(uuid.uuid4())
    answer = await client.post(
        "/api/conversations",
        json={
            "agent": {"kind": "Agent", "llm": {"model": "m", "api_key": "sk-secret-1"}},
            "conversation_id": cid,
        },
    )
    assert answer.status_code == 503
    assert answer.json()["reason"] == "NO_AGENT_WORKER"
    assert "openhands-sdk worker" in answer.json()["detail"]
    # The conversation waits for a worker in convsvc; its secrets are not stored.
    assert b"sk-secret-1" not in await asyncio.to_thread(_stored_bytes, app.settings.data_dir)


def _stored_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())


def test_event_filters_match_stock() -> None:
    message = {
        "kind": "MessageEvent",
        "source": "user",
        "timestamp": "2026-12-07T10:00:00.000001",
        "llm_message": {"role": "user", "content": [{"type": "text", "text": "Find the NEEDLE"}]},
    }
    action = {"kind": "ActionEvent", "source": "agent", "timestamp": "2026-12-07T10:00:01"}
    assert records.matches(message, body="needle")
    assert not records.matches(action, body="needle")  # stock searches messages only
    assert records.matches(action, kind="ActionEvent", source="agent")
    assert records.matches(action, kind="openhands.sdk.event.ActionEvent")
    assert not records.matches(action, kind="MessageEvent")
    assert records.matches(message, timestamp_gte="2026-12-07T10:00:00")
    assert not records.matches(message, timestamp_lt="2026-12-07T10:00:00")
    assert records.sdk_event({"observation": "agent_server_event", "event": action}) == action
    assert records.sdk_event({"observation": "agent_state_changed", "extras": {}}) is None
    assert records.execution_status("awaiting_user_input") == "idle"
    assert records.execution_status("stopped") == "paused"
