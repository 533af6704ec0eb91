"""Approvals over gRPC with the echo agent in confirmation mode: the pending action a
conversation shows, ConfirmAction's approve and reject, what a stale, unknown, crossed or
retried decision does, the watch and the list of conversations awaiting a decision.

In confirmation mode the echo agent proposes each message as a command (risk HIGH for one
that removes files) and waits for approval, in the order and shapes OpenHands uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from convclient import (
    ApprovalDecision,
    AsyncConvsvcClient,
    ChangeKind,
    FailedPreconditionError,
    InvalidArgumentError,
    SecurityRisk,
)
from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.helpers import agent_state_is, error_info, expect_error, grpc_events_until

CONFIRMING = {"confirmation_mode": True}
AWAITING = "awaiting_user_confirmation"


def message(text: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": text}}


def decisions(payloads: list[dict[str, Any]]) -> list[str]:
    return [
        p["args"]["agent_state"]
        for p in payloads
        if p.get("action") == "change_agent_state" and p.get("source") == "user"
    ]


@pytest.fixture
async def client(app: ConvsvcApp) -> AsyncIterator[AsyncConvsvcClient]:
    assert app.server is not None
    async with AsyncConvsvcClient(address=app.server.address) as connected:
        yield connected


async def proposing(
    client: AsyncConvsvcClient,
    stub: pb_grpc.ConversationServiceStub,
    cid: str,
    command: str,
    user_id: str = "",
) -> int:
    """A conversation whose agent waits for approval of ``command``; its action's id."""
    await client.start_conversation(cid, settings=CONFIRMING, user_id=user_id)
    await client.send_event(message(command), conversation_id=cid)
    payloads = await grpc_events_until(
        stub,
        cid,
        lambda ps: any(
            p.get("args", {}).get("confirmation_state") == "awaiting_confirmation" for p in ps
        ),
    )
    return int(payloads[-1]["id"])


async def test_an_approved_action_runs_and_the_conversation_shows_it_until_decided(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    action_id = await proposing(client, stub, "c", "ls -la")
    conversation = await client.get_conversation("c")
    assert conversation.agent_state == AWAITING
    pending = conversation.pending_action
    assert pending is not None
    assert (pending.event_id, pending.action, pending.content) == (action_id, "run", "ls -la")
    assert pending.security_risk is SecurityRisk.LOW

    approved = await client.approve_action("c", action_id)
    assert approved.agent_state == "user_confirmed" and approved.event_id > action_id
    payloads = await grpc_events_until(stub, "c", agent_state_is("awaiting_user_input"))
    assert decisions(payloads) == ["user_confirmed"]
    ran = [p for p in payloads if p.get("observation") == "run"]
    assert [p["content"] for p in ran] == ["ls -la"]
    assert (await client.get_conversation("c")).pending_action is None


async def test_a_rejected_action_does_not_run(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    action_id = await proposing(client, stub, "c", "rm -rf /tmp/work")
    pending = (await client.get_conversation("c")).pending_action
    assert pending is not None and pending.security_risk is SecurityRisk.HIGH
    rejected = await client.reject_action("c", action_id)
    assert rejected.agent_state == "user_rejected"
    payloads = await grpc_events_until(stub, "c", agent_state_is("awaiting_user_input"))
    assert decisions(payloads) == ["user_rejected"]
    assert not [p for p in payloads if p.get("observation") == "run"]
    assert [p for p in payloads if p.get("observation") == "user_rejected"]


async def test_only_the_pending_action_can_be_decided_and_only_once(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await client.start_conversation("idle", settings=CONFIRMING)
    with pytest.raises(FailedPreconditionError) as nothing:
        await client.approve_action("idle", 0)
    assert nothing.value.reason == "ACTION_NOT_PENDING"
    assert nothing.value.metadata["pending_action_id"] == ""

    action_id = await proposing(client, stub, "c", "make test")
    with pytest.raises(FailedPreconditionError) as unknown:
        await client.approve_action("c", action_id - 1)
    assert unknown.value.reason == "ACTION_NOT_PENDING"
    assert unknown.value.metadata["pending_action_id"] == str(action_id)

    first = await client.approve_action("c", action_id, request_id="decide-1")
    # A retry (same request id) gets the first answer; another decision is stale.
    again = await client.approve_action("c", action_id, request_id="decide-1")
    assert again.event_id == first.event_id
    with pytest.raises(FailedPreconditionError) as stale:
        await client.reject_action("c", action_id, request_id="decide-2")
    assert stale.value.reason == "ACTION_NOT_PENDING"
    payloads = await grpc_events_until(stub, "c", agent_state_is("awaiting_user_input"))
    assert decisions(payloads) == ["user_confirmed"]


async def test_crossing_decisions_write_one_event(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    action_id = await proposing(client, stub, "c", "make deploy")
    outcomes = await asyncio.gather(
        *(
            client.confirm_action("c", action_id, decision)
            for decision in [ApprovalDecision.APPROVE, ApprovalDecision.REJECT] * 4
        ),
        return_exceptions=True,
    )
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(answered) == 1
    assert all(
        isinstance(o, FailedPreconditionError) and o.reason == "ACTION_NOT_PENDING" for o in refused
    ), refused
    payloads = await grpc_events_until(stub, "c", agent_state_is("awaiting_user_input"))
    assert len(decisions(payloads)) == 1


async def test_a_paused_proposal_is_asked_again_under_a_new_id(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    first = await proposing(client, stub, "c", "make build")
    await client.pause_agent("c")
    assert (await client.get_conversation("c")).pending_action is None  # paused, not waiting
    await client.resume_agent("c")
    payloads = await grpc_events_until(
        stub, "c", lambda ps: sum(p.get("action") == "run" for p in ps) == 2
    )
    second = int(payloads[-1]["id"])
    assert second > first
    with pytest.raises(FailedPreconditionError):
        await client.approve_action("c", first)
    assert (await client.approve_action("c", second)).agent_state == "user_confirmed"


async def test_the_watch_reports_the_pending_action_and_its_decision(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await client.start_conversation("c", settings=CONFIRMING)
    watch = client.watch_conversations(conversation_ids=["c"])
    assert (await anext(watch)).snapshot is not None
    await client.send_event(message("make check"), conversation_id="c")
    changes = []
    async with asyncio.timeout(10):
        while not any(c.kind is ChangeKind.PENDING_ACTION_CHANGED for c in changes):
            changes += (await anext(watch)).changes
    proposed = next(c for c in changes if c.kind is ChangeKind.PENDING_ACTION_CHANGED)
    pending = proposed.watched.conversation.pending_action
    assert pending is not None and pending.content == "make check"
    await client.approve_action("c", pending.event_id)
    async with asyncio.timeout(10):
        while True:
            update = await anext(watch)
            decided = [c for c in update.changes if c.kind is ChangeKind.AGENT_STATE_CHANGED]
            if decided:
                break
    assert decided[0].watched.conversation.agent_state == "user_confirmed"
    assert decided[0].watched.conversation.pending_action is None
    await watch.aclose()


async def test_conversations_awaiting_a_decision_can_be_listed(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    for cid in ("a", "b", "c"):  # users of their own: no one reaches the per-user limit
        await proposing(client, stub, cid, f"build {cid}", user_id=f"user-{cid}")
    await client.start_conversation("idle", settings=CONFIRMING)
    page = await client.list_conversations(agent_states=[AWAITING], page_size=2)
    rest = await client.list_conversations(
        agent_states=[AWAITING], page_size=2, page_token=page.next_page_token
    )
    listed = [c.conversation_id for c in page.items + rest.items]
    assert listed == ["a", "b", "c"] and not rest.next_page_token
    assert all(c.pending_action is not None for c in page.items + rest.items)
    # The token belongs to its filter.
    with pytest.raises(InvalidArgumentError):
        await client.list_conversations(page_size=2, page_token=page.next_page_token)


async def test_bad_decisions_are_refused_precisely(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    action_id = await proposing(client, stub, "c", "make")
    await expect_error(
        stub.ConfirmAction(pb.ConfirmActionRequest(conversation_id="c", action_id=action_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await expect_error(
        stub.ConfirmAction(
            pb.ConfirmActionRequest(
                conversation_id="c", action_id=-1, decision=pb.APPROVAL_DECISION_APPROVE
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await expect_error(
        stub.ListConversations(pb.ListConversationsRequest(agent_states=["no spaces"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ID",
    )
    await expect_error(
        stub.ConfirmAction(
            pb.ConfirmActionRequest(
                conversation_id="nobody", action_id=0, decision=pb.APPROVAL_DECISION_APPROVE
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    await client.close_conversation("c")
    with pytest.raises(FailedPreconditionError) as stopped:
        await client.approve_action("c", action_id)
    assert stopped.value.reason == "CONVERSATION_NOT_RUNNING"
    page = await client.list_audit_entries(conversation_id="c")
    audited = [(e.code, e.reason) for e in page.items if e.method == "ConfirmAction"]
    assert audited[-1] == ("FAILED_PRECONDITION", "CONVERSATION_NOT_RUNNING")


async def test_a_decision_racing_a_close_fails_precisely_or_is_logged_once(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    for round_ in range(5):
        cid = f"race-{round_}"
        action_id = await proposing(client, stub, cid, "make")
        decided, _ = await asyncio.gather(
            stub.ConfirmAction(
                pb.ConfirmActionRequest(
                    conversation_id=cid, action_id=action_id, decision=pb.APPROVAL_DECISION_APPROVE
                )
            ),
            client.close_conversation(cid),
            return_exceptions=True,
        )
        if isinstance(decided, grpc.aio.AioRpcError):
            assert decided.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.UNAVAILABLE,
            ), decided.details()
            assert error_info(decided).reason in (
                "CONVERSATION_NOT_RUNNING",
                "CONVERSATION_CLOSED",
            )
        else:
            assert not isinstance(decided, BaseException), decided
        page = await client.search_events(cid)
        assert len(decisions([e.payload for e in page.items])) <= 1
