"""What convsvc adds behind the agent-server API: a worker killed or convsvc itself killed
loses nothing (the conversation comes back from the log, with its history), users are kept
apart by their session keys (scoped tokens), and per-user limits answer 429 with a reason."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from convclient import ConvsvcClient
from tests.agent_server import sdk
from tests.agent_server.conftest import KEY, Backend, convsvc_backend, start_worker
from tests.agent_server.fake_llm import SdkFakeLLM
from tests.agent_server.test_client_suite import all_events


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[Backend]:
    """convsvc and one worker of this test's own (the test kills them)."""
    with convsvc_backend(tmp_path) as backend:
        yield backend


def test_kill_9_of_the_worker_then_of_convsvc_loses_nothing(
    isolated: Backend, fake_llm: SdkFakeLLM, tmp_path: Path
) -> None:
    server = isolated.convsvc
    assert server is not None
    conversation, recorder = sdk.start(
        isolated, fake_llm, str(tmp_path), initial="run: echo first-message"
    )
    cid = str(conversation.id)
    recorder.wait_for(sdk.is_finish, "finish of the first run")
    sdk.run_over(recorder)
    before_worker_kill = all_events(isolated, cid)

    # The worker dies (kill -9): the conversation moves to a live worker, from the log.
    isolated.workers.append(start_worker(tmp_path, server.address, "worker-b"))
    isolated.workers[0].kill()
    asked = len(fake_llm.requests)
    conversation.send_message("run: echo second-message")
    conversation.run()
    after_worker_kill = all_events(isolated, cid)
    assert [e["id"] for e in after_worker_kill[: len(before_worker_kill)]] == [
        e["id"] for e in before_worker_kill
    ]
    finishes = [
        e
        for e in after_worker_kill
        if e["kind"] == "ActionEvent" and e.get("tool_name") == "finish"
    ]
    assert len(finishes) == 2
    assert any("run: echo first-message" in p for p in fake_llm.prompts()[asked:])
    conversation.close()

    # convsvc dies (kill -9) and restarts on the same data directory.
    server.restart(signal.SIGKILL)
    after_restart = all_events(isolated, cid)
    assert [e["id"] for e in after_restart] == [e["id"] for e in after_worker_kill]
    attached = sdk.attach(isolated, cid, str(tmp_path))
    asked = len(fake_llm.requests)
    attached.send_message("run: echo third-message")
    attached.run()
    prompts = fake_llm.prompts()[asked:]
    assert any(
        "run: echo first-message" in p and "run: echo second-message" in p for p in prompts
    ), "the third message is answered with the whole history"
    # The LLM key came back from the snapshot (encrypted there), not from the client...
    assert fake_llm.api_keys[-1] == f"Bearer {sdk.LLM_KEY}"
    # ...and never reached convsvc's store or logs in the clear.
    assert sdk.LLM_KEY.encode() not in server.stored_and_logged_bytes()
    final = all_events(isolated, cid)
    assert [e["id"] for e in final[: len(after_restart)]] == [e["id"] for e in after_restart]
    assert len({e["id"] for e in final}) == len(final)
    attached.close()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Backend]:
    """convsvc allowing one running conversation per user (refusing more), and two workers
    that run one conversation each."""
    with convsvc_backend(
        tmp_path,
        workers=(("worker-a", 1), ("worker-b", 1)),
        CONVSVC_ENGINE__MAX_CONCURRENT_CONVERSATIONS="1",
        CONVSVC_ENGINE__ADMISSION_POLICY="reject",
    ) as backend:
        yield backend


def test_users_apart_and_limited(limited: Backend, fake_llm: SdkFakeLLM, tmp_path: Path) -> None:
    assert limited.convsvc is not None
    with ConvsvcClient(address=limited.convsvc.address, token=KEY) as admin:
        alice = admin.mint_token("alice", ["read", "write", "admin"]).token
        bob = admin.mint_token("bob", ["read", "write", "admin"]).token
    first, first_events = sdk.start(
        limited, fake_llm, str(tmp_path / "a"), initial="run: echo alice", key=alice
    )
    second, second_events = sdk.start(
        limited, fake_llm, str(tmp_path / "b"), initial="run: echo bob", key=bob
    )
    try:
        first_events.wait_for(sdk.is_finish, "alice's finish")
        second_events.wait_for(sdk.is_finish, "bob's finish")
        with limited.http(key=alice) as http:
            assert http.get(f"/api/conversations/{second.id}").status_code == 404
            assert http.get(f"/api/conversations/{second.id}/events/search").status_code == 404
            assert http.post(f"/api/conversations/{second.id}/run").status_code == 404
            mine = http.get("/api/conversations/search").json()["items"]
            assert [c["id"] for c in mine] == [str(first.id)]
            # One running conversation per user, refused beyond (not a silent pause).
            refused = http.post(
                "/api/conversations",
                json=sdk.create_body(fake_llm, str(tmp_path / "c"), str(uuid.uuid4())),
            )
            assert refused.status_code == 429, refused.text
            assert refused.json()["reason"]
        with limited.http(key=bob) as http:
            assert [c["id"] for c in http.get("/api/conversations/search").json()["items"]] == [
                str(second.id)
            ]
        # Both ran at once, one on each worker (each runs one conversation).
        with ConvsvcClient(address=limited.convsvc.address, token=KEY) as admin:
            running = [admin.get_conversation(str(c.id)).status for c in (first, second)]
        assert [s.value for s in running] == ["RUNNING", "RUNNING"]
    finally:
        first.close()
        second.close()
