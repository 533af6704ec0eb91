"""Three nodes on one PostgreSQL serve the whole API: any node answers for any conversation,
as the owner would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from convclient.structs import dict_to_struct
from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.conftest import Cluster
from tests.helpers import agent_state_is, echo_of, expect_error, grpc_events_until, ids
from tests.service.test_watch import KIND, Watch


def message(text: str) -> pb.SendEventRequest:
    return dict_to_struct({"action": "message", "args": {"content": text}})


async def test_any_node_answers_for_any_conversation(cluster: Callable[..., Cluster]) -> None:
    a, b, c = cluster(3).nodes
    started = await a.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv-1", user_id="alice")
    )
    assert started.conversation.conversation_id == "conv-1"
    joined = await b.stub.JoinConversation(
        pb.JoinConversationRequest(
            conversation_id="conv-1",
            connection_id="tab-1",
            user_id="alice",
            client_instance_id="web-1",
        )
    )
    assert joined.connection.conversation_id == "conv-1"
    # By connection id through a third node, by conversation id through the first.
    sent = await c.stub.SendEvent(
        pb.SendEventRequest(connection_id="tab-1", user_id="alice", event=message("hello"))
    )
    assert sent.conversation_id == "conv-1"
    seen_on_b = await grpc_events_until(b.stub, "conv-1", echo_of("hello"), user_id="alice")
    seen_on_c = await grpc_events_until(c.stub, "conv-1", echo_of("hello"), user_id="alice")
    assert ids(seen_on_b) == ids(seen_on_c) == list(range(len(ids(seen_on_b))))
    assert sent.event_id in ids(seen_on_b)

    views = [
        (
            await node.stub.GetConversation(
                pb.GetConversationRequest(conversation_id="conv-1", user_id="alice")
            )
        ).conversation
        for node in (a, b, c)
    ]
    assert len({v.SerializeToString() for v in views}) == 1  # the owner's answer, everywhere
    assert views[0].connection_count == 1
    for node in (a, b, c):
        listed = await node.stub.ListConversations(pb.ListConversationsRequest(user_id="alice"))
        assert [v.conversation_id for v in listed.conversations] == ["conv-1"]
        connections = await node.stub.ListConnections(pb.ListConnectionsRequest())
        assert [(x.connection_id, x.client_instance_id) for x in connections.connections] == [
            ("tab-1", "web-1")
        ]
    beat = await c.stub.Heartbeat(pb.HeartbeatRequest(client_instance_id="web-1"))
    assert beat.connection_count == 1

    # Another user sees nothing, through any node.
    await expect_error(
        c.stub.GetConversation(pb.GetConversationRequest(conversation_id="conv-1", user_id="eve")),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    removed = await a.stub.DisconnectConnection(
        pb.DisconnectConnectionRequest(connection_id="tab-1", user_id="alice")
    )
    assert removed.removed
    closed = await c.stub.CloseConversation(
        pb.CloseConversationRequest(conversation_id="conv-1", user_id="alice")
    )
    assert closed.conversation.status == pb.CONVERSATION_STATUS_STOPPED
    # Closed: any node may start it again, and it continues the same log.
    again = await b.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv-1", user_id="alice")
    )
    assert again.conversation.latest_event_id > sent.event_id


async def test_a_retry_through_another_node_appends_once(cluster: Callable[..., Cluster]) -> None:
    a, b, c = cluster(3).nodes
    await a.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv", user_id="alice")
    )
    request = pb.SendEventRequest(
        conversation_id="conv", user_id="alice", event=message("once"), request_id="req-1"
    )
    first = await b.stub.SendEvent(request)
    again = await c.stub.SendEvent(request)  # the answer was lost: retried elsewhere
    assert again.event_id == first.event_id
    log = await grpc_events_until(b.stub, "conv", echo_of("once"), user_id="alice")
    assert [p["id"] for p in log if p.get("message") == "once" and p["source"] == "user"] == [
        first.event_id
    ]
    changed = pb.SendEventRequest(
        conversation_id="conv", user_id="alice", event=message("other"), request_id="req-1"
    )
    await expect_error(
        c.stub.SendEvent(changed), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_CONFLICT"
    )


async def test_an_eviction_on_another_node_reaches_its_viewers(
    cluster: Callable[..., Cluster],
) -> None:
    a, b = cluster(2, CONVSVC_ENGINE__MAX_CONCURRENT_CONVERSATIONS="1").nodes
    await a.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="old", user_id="alice")
    )
    seen: list[dict[str, object]] = []

    async def watch() -> None:
        seen.extend(
            await grpc_events_until(
                b.stub,
                "old",
                lambda payloads: any(
                    p.get("extras", {}).get("agent_state") == "stopped" for p in payloads
                ),
                user_id="alice",
                timeout=20,
            )
        )

    watcher = asyncio.create_task(watch())
    await grpc_events_until(b.stub, "old", lambda p: len(ids(p)) >= 2, user_id="alice")
    await b.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="new", user_id="alice")
    )
    await watcher
    statuses = [p["status_update_item"] for p in seen if "status_update_item" in p]
    assert any(s.get("id") == "AGENT_ERROR$TOO_MANY_CONVERSATIONS" for s in statuses), seen
    listed = await a.stub.ListConversations(pb.ListConversationsRequest(user_id="alice"))
    assert [v.conversation_id for v in listed.conversations] == ["new"]


async def test_nodes_forward_with_the_shared_service_token(
    cluster: Callable[..., Cluster],
) -> None:
    a, b = cluster(2, CONVSVC_AUTH_TOKEN="cluster-secret").nodes
    token = (("authorization", "Bearer cluster-secret"),)
    await a.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv", user_id="alice"), metadata=token
    )
    sent = await b.stub.SendEvent(  # forwarded to a, which requires the token too
        pb.SendEventRequest(conversation_id="conv", user_id="alice", event=message("hi")),
        metadata=token,
    )
    assert sent.conversation_id == "conv"
    await expect_error(
        b.stub.SendEvent(
            pb.SendEventRequest(conversation_id="conv", user_id="alice", event=message("no"))
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )

    # A scoped token minted by one node works through the others, within its scope, and
    # its revocation on one node reaches them all (it is stored in PostgreSQL).
    minted = await b.stub.MintToken(
        pb.MintTokenRequest(
            user_id="alice", conversation_ids=["conv"], permissions=[pb.PERMISSION_WRITE]
        ),
        metadata=token,
    )
    scoped = (("authorization", f"Bearer {minted.token}"),)
    sent = await b.stub.SendEvent(  # through b, to a's loop, as alice
        pb.SendEventRequest(conversation_id="conv", event=message("scoped")), metadata=scoped
    )
    assert sent.conversation_id == "conv"
    await expect_error(
        b.stub.CloseConversation(
            pb.CloseConversationRequest(conversation_id="conv"), metadata=scoped
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "TOKEN_SCOPE",
    )
    await a.stub.RevokeToken(pb.RevokeTokenRequest(token_id=minted.token_id), metadata=token)
    for node in (a, b):
        await expect_error(
            node.stub.SendEvent(
                pb.SendEventRequest(conversation_id="conv", event=message("late")),
                metadata=scoped,
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )
    # The send is audited once, by the node it reached, with the token's subject.
    audit = await b.stub.ListAuditEntries(
        pb.ListAuditEntriesRequest(conversation_id="conv"), metadata=token
    )
    sends = [e for e in audit.entries if e.method == "SendEvent" and e.code == "OK"]
    assert [(e.credential, e.subject) for e in sends] == [("service", ""), ("token", "alice")]


async def test_joins_racing_on_one_id_through_every_node_get_one_conversation(
    cluster: Callable[..., Cluster],
) -> None:
    nodes = cluster(3).nodes
    for round_ in range(5):
        cid = f"race-{round_}"
        joins = [
            node.stub.JoinConversation(
                pb.JoinConversationRequest(
                    conversation_id=cid, connection_id=f"tab-{round_}-{n}", user_id="alice"
                )
            )
            for n, node in enumerate(nodes * 2)
        ]
        answers = await asyncio.gather(*joins)
        assert {a.conversation.conversation_id for a in answers} == {cid}
        log = await grpc_events_until(
            nodes[0].stub, cid, lambda p: len(ids(p)) >= 2, user_id="alice"
        )
        states = [p["extras"]["agent_state"] for p in log if "extras" in p]
        assert states.count("loading") == 1  # started once, by one owner
        listed = await nodes[2].stub.ListConnections(
            pb.ListConnectionsRequest(conversation_ids=[cid])
        )
        assert len(listed.connections) == 6


async def test_a_watch_through_one_node_sees_the_whole_cluster_and_resumes_through_another(
    cluster: Callable[..., Cluster],
) -> None:
    a, b, c = cluster(3).nodes
    await b.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="before", user_id="alice")
    )
    watch = Watch(a.stub, user_id="alice")
    snapshot = await watch.snapshot()
    assert list(snapshot) == ["before"]  # run by b, watched through a

    # Conversations each node runs reach the one watch, with their connections.
    for node, cid in ((b, "on-b"), (c, "on-c")):
        await node.stub.StartConversation(
            pb.StartConversationRequest(conversation_id=cid, user_id="alice")
        )
        await watch.changes_until(KIND.CONVERSATION_CHANGE_KIND_CREATED, cid)
    await c.stub.JoinConversation(
        pb.JoinConversationRequest(conversation_id="on-b", connection_id="tab", user_id="alice")
    )
    joined = await watch.changes_until(KIND.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED, "on-b")
    assert list(joined[-1].watched.connection_ids) == ["tab"]
    token = watch.token
    watch.call.cancel()

    # What happens meanwhile is resumed through another node, with no snapshot.
    await a.stub.CloseConversation(pb.CloseConversationRequest(conversation_id="on-c"))
    resumed = Watch(c.stub, user_id="alice", resume_token=token)
    closed = await resumed.changes_until(KIND.CONVERSATION_CHANGE_KIND_CLOSED, "on-c")
    assert closed[-1].watched.conversation.status == pb.CONVERSATION_STATUS_STOPPED
    resumed.call.cancel()

    # Another user's watch sees none of it; a token that is not a cluster's is refused.
    assert await Watch(b.stub, user_id="bob").snapshot() == {}
    bad = b.stub.WatchConversations(pb.WatchConversationsRequest(resume_token="abc.1"))
    await expect_error(bad.read(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESUME_TOKEN")


async def test_run_control_through_another_node_reaches_the_owner_s_agent(
    cluster: Callable[..., Cluster],
) -> None:
    a, b = cluster(2).nodes
    thinking = dict_to_struct({"echo_reply_delay_seconds": 600})
    await a.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="ctl", user_id="alice", settings=thinking)
    )
    await b.stub.SendEvent(
        pb.SendEventRequest(conversation_id="ctl", user_id="alice", event=message("think"))
    )
    await grpc_events_until(b.stub, "ctl", agent_state_is("running"), user_id="alice")
    # A busy agent refuses a message sent through another node, as through its owner.
    await expect_error(
        b.stub.SendEvent(
            pb.SendEventRequest(
                conversation_id="ctl",
                user_id="alice",
                event=message("refused"),
                busy_policy=pb.BUSY_POLICY_REJECT,
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONVERSATION_BUSY",
    )
    request = pb.ControlAgentRequest(
        conversation_id="ctl", user_id="alice", control=pb.AGENT_CONTROL_PAUSE, request_id="p1"
    )
    paused = await b.stub.ControlAgent(request)
    assert paused.agent_state == "paused" and paused.HasField("event_id")
    # The retry through the owner answers the same, once.
    assert await a.stub.ControlAgent(request) == paused
    stopped = await b.stub.ControlAgent(
        pb.ControlAgentRequest(
            conversation_id="ctl", user_id="alice", control=pb.AGENT_CONTROL_INTERRUPT
        )
    )
    assert stopped.agent_state == "stopped"
    seen = await grpc_events_until(a.stub, "ctl", agent_state_is("stopped"), user_id="alice")
    assert [p["args"]["agent_state"] for p in seen if p.get("action") == "change_agent_state"] == [
        "paused",
        "stopped",
    ]


async def test_approvals_through_another_node_reach_the_owner_s_agent(
    cluster: Callable[..., Cluster],
) -> None:
    a, b = cluster(2).nodes
    confirming = dict_to_struct({"confirmation_mode": True})
    for cid in ("ok-1", "ok-2"):
        await a.stub.StartConversation(
            pb.StartConversationRequest(conversation_id=cid, user_id="alice", settings=confirming)
        )
    await b.stub.SendEvent(
        pb.SendEventRequest(conversation_id="ok-1", user_id="alice", event=message("make"))
    )
    await grpc_events_until(  # the action awaiting confirmation (logged after the state)
        b.stub,
        "ok-1",
        lambda ps: any(
            p.get("args", {}).get("confirmation_state") == "awaiting_confirmation" for p in ps
        ),
        user_id="alice",
    )
    # Every node lists it as waiting, with its pending action (ok-2 waits for nothing).
    for node in (a, b):
        listed = await node.stub.ListConversations(
            pb.ListConversationsRequest(
                user_id="alice", agent_states=["awaiting_user_confirmation"], page_size=1
            )
        )
        assert [c.conversation_id for c in listed.conversations] == ["ok-1"]
        assert not listed.next_page_token
    pending = listed.conversations[0].pending_action
    assert (pending.action, pending.content) == ("run", "make")
    request = pb.ConfirmActionRequest(
        conversation_id="ok-1",
        user_id="alice",
        action_id=pending.event_id,
        decision=pb.APPROVAL_DECISION_APPROVE,
        request_id="d1",
    )
    approved = await b.stub.ConfirmAction(request)
    assert approved.agent_state == "user_confirmed"
    # The retry, through the owner: the same event, and the state the agent is in now.
    retried = await a.stub.ConfirmAction(request)
    assert retried.event_id == approved.event_id
    assert retried.agent_state != "awaiting_user_confirmation"
    await expect_error(
        b.stub.ConfirmAction(
            pb.ConfirmActionRequest(
                conversation_id="ok-1",
                user_id="alice",
                action_id=pending.event_id,
                decision=pb.APPROVAL_DECISION_REJECT,
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACTION_NOT_PENDING",
    )
    seen = await grpc_events_until(
        a.stub, "ok-1", agent_state_is("awaiting_user_input"), user_id="alice"
    )
    assert [p["content"] for p in seen if p.get("observation") == "run"] == ["make"]


async def test_search_and_updates_through_any_node(cluster: Callable[..., Cluster]) -> None:
    a, b = cluster(2).nodes
    for node, cid in ((a, "on-a"), (b, "on-b")):
        await node.stub.StartConversation(
            pb.StartConversationRequest(
                conversation_id=cid, user_id="alice", labels={"team": "red"}, title=cid
            )
        )
    await a.stub.CloseConversation(pb.CloseConversationRequest(conversation_id="on-a"))
    # Any node finds both, the running one with its owner's stored state.
    for node in (a, b):
        found = await node.stub.SearchConversations(
            pb.SearchConversationsRequest(user_id="alice", labels={"team": "red"})
        )
        statuses = {c.conversation_id: c.status for c in found.conversations}
        assert statuses == {
            "on-a": pb.CONVERSATION_STATUS_STOPPED,
            "on-b": pb.CONVERSATION_STATUS_RUNNING,
        }
    running = await a.stub.SearchConversations(
        pb.SearchConversationsRequest(statuses=[pb.CONVERSATION_STATUS_RUNNING], user_id="alice")
    )
    assert [c.conversation_id for c in running.conversations] == ["on-b"]
    # An update through a node that does not run it reaches the owner's live copy.
    updated = await a.stub.UpdateConversation(
        pb.UpdateConversationRequest(
            conversation_id="on-b",
            user_id="alice",
            labels={"team": "blue"},
            update_mask={"paths": ["labels"]},
        )
    )
    assert dict(updated.conversation.labels) == {"team": "blue"}
    got = await b.stub.GetConversation(pb.GetConversationRequest(conversation_id="on-b"))
    assert dict(got.conversation.labels) == {"team": "blue"}
    blue = await b.stub.SearchConversations(pb.SearchConversationsRequest(labels={"team": "blue"}))
    assert [c.conversation_id for c in blue.conversations] == ["on-b"]


async def test_a_fork_on_one_node_copies_a_log_another_node_runs(
    cluster: Callable[..., Cluster],
) -> None:
    a, b = cluster(2).nodes
    await a.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="src", user_id="alice")
    )
    await a.stub.SendEvent(
        pb.SendEventRequest(conversation_id="src", user_id="alice", event=message("hi"))
    )
    source = await grpc_events_until(
        a.stub, "src", lambda ps: any(p.get("source") == "agent" for p in ps), user_id="alice"
    )
    forked = await b.stub.ForkConversation(
        pb.ForkConversationRequest(
            source_conversation_id="src", conversation_id="fork", user_id="alice"
        )
    )
    assert forked.conversation.user_id == "alice"
    await b.stub.SendEvent(
        pb.SendEventRequest(conversation_id="fork", user_id="alice", event=message("again"))
    )
    copied = await grpc_events_until(
        a.stub,
        "fork",
        lambda ps: (
            [p["args"]["content"] for p in ps if p.get("source") == "agent"] == ["hi", "again"]
        ),
        user_id="alice",
    )
    assert copied[: len(source)] == source
    await expect_error(
        a.stub.ForkConversation(
            pb.ForkConversationRequest(source_conversation_id="src", conversation_id="fork")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "CONVERSATION_EXISTS",
    )
