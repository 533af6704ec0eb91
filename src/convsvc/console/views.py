"""What the console shows, as JSON for its page: conversations, events rendered for people,
audit entries. Secrets never reach the page: payloads go through convsvc's redaction, and
the page renders every value as text."""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import MessageToDict

from convclient.models import Event
from convsvc.redaction import redact
from convsvc.v1 import conversation_service_pb2 as pb

JsonObject = dict[str, Any]

_SUMMARY_LIMIT = 2000


def _iso(message: Any, field: str) -> str | None:
    if not message.HasField(field):
        return None
    return str(getattr(message, field).ToJsonString())


def conversation(message: pb.Conversation, connection_ids: list[str] | None = None) -> JsonObject:
    pending = None
    if message.HasField("pending_action"):
        pending = {
            "event_id": message.pending_action.event_id,
            "action": message.pending_action.action,
            "content": _cut(message.pending_action.content),
        }
    return {
        "id": message.conversation_id,
        "user": message.user_id,
        "agent": message.agent,
        "status": pb.ConversationStatus.Name(message.status).removeprefix("CONVERSATION_STATUS_"),
        "agent_state": message.agent_state,
        "latest_event_id": message.latest_event_id,
        "created": _iso(message, "create_time"),
        "last_active": _iso(message, "last_active_time"),
        "connections": message.connection_count,
        "queue_position": message.queue_position,
        "owner": message.owner_address,
        "pending_action": pending,
        "labels": dict(message.labels),
        "title": message.title,
        **({"connection_ids": connection_ids} if connection_ids is not None else {}),
    }


def change(message: pb.ConversationChange) -> JsonObject:
    return {
        "kind": pb.ConversationChangeKind.Name(message.kind).removeprefix(
            "CONVERSATION_CHANGE_KIND_"
        ),
        "conversation": conversation(
            message.watched.conversation, list(message.watched.connection_ids)
        ),
    }


def event(found: Event) -> JsonObject:
    payload = redact(found.payload)
    return {
        "id": found.id,
        "time": found.timestamp.isoformat(),
        "source": found.source,
        "kind": found.kind,
        "name": found.name,
        "summary": _cut(summary(found.name, payload)),
        "payload": payload,
    }


def status_update(update: JsonObject) -> JsonObject:
    return {
        "status": True,
        "summary": _cut(str(update.get("message") or update.get("id") or "status update")),
        "payload": redact(update),
    }


def audit_entry(message: pb.AuditEntry) -> JsonObject:
    found = MessageToDict(message, preserving_proto_field_name=True)
    found["sequence"] = message.sequence
    return found


def summary(name: str, payload: JsonObject) -> str:
    """One line (or a few) a person reads: what was said, run, edited or decided."""
    args: JsonObject = payload["args"] if isinstance(payload.get("args"), dict) else {}
    extras: JsonObject = payload["extras"] if isinstance(payload.get("extras"), dict) else {}
    if name == "agent_server_event":
        return _sdk_summary(payload.get("event") or {})
    if name == "message":
        return str(args.get("content") or payload.get("message") or "")
    if name == "run":
        if "command" in args:
            return f"$ {args['command']}"
        exit_code = extras.get("exit_code", extras.get("metadata", {}).get("exit_code", ""))
        return f"{payload.get('content', '')}".rstrip() + (
            f"\n[exit code {exit_code}]" if exit_code != "" else ""
        )
    if name in ("edit", "write", "read") or "path" in args:
        return f"{name} {args.get('path', '')}".strip()
    if name == "finish":
        said = args.get("final_thought") or args.get("message") or payload.get("message", "")
        return f"finished: {said}"
    if name == "agent_state_changed":
        return f"agent state: {extras.get('agent_state', '')}"
    if name == "change_agent_state":
        return f"asked: {args.get('agent_state', '')}"
    content = payload.get("content") or payload.get("message")
    return str(content) if content else name


def _sdk_summary(sdk: JsonObject) -> str:
    kind = str(sdk.get("kind", "event"))
    if kind == "MessageEvent":
        message = sdk.get("llm_message") or {}
        return " ".join(
            str(p.get("text", "")) for p in message.get("content") or [] if isinstance(p, dict)
        )
    if kind == "ActionEvent":
        action = sdk.get("action") or {}
        command = action.get("command") or action.get("message") or action.get("path") or ""
        return f"{sdk.get('tool_name', 'action')}: {command}"
    if kind == "ObservationEvent":
        observation = sdk.get("observation") or {}
        content = observation.get("content") or []
        if isinstance(content, list):
            return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return str(content)
    if kind == "ConversationStateUpdateEvent":
        value = "…" if sdk.get("key") == "full_state" else sdk.get("value")
        return f"state: {sdk.get('key')} = {value}"
    return kind


def _cut(text: str) -> str:
    return text if len(text) <= _SUMMARY_LIMIT else text[:_SUMMARY_LIMIT] + "…"


def worker(message: pb.WorkerInfo) -> JsonObject:
    return {
        "worker_id": message.worker_id,
        "kinds": list(message.kinds),
        "capacity": message.capacity,
        "load": message.load,
        "conversation_ids": list(message.conversation_ids),
        "node_address": message.node_address,
    }


def node(message: pb.NodeInfo) -> JsonObject:
    return {
        "node_id": message.node_id,
        "address": message.address,
        "heartbeat_time": _iso(message, "heartbeat_time"),
        "lease_expire_time": _iso(message, "lease_expire_time"),
        "conversations": message.conversation_count,
        "agent_kinds": list(message.agent_kinds),
    }
