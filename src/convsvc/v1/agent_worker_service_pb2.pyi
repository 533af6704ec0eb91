from convsvc.v1 import conversation_service_pb2 as _conversation_service_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerEvent(_message.Message):
    __slots__ = ("id", "source", "payload", "delivery_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    source: str
    payload: _struct_pb2.Struct
    delivery_id: str
    def __init__(self, id: _Optional[int] = ..., source: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., delivery_id: _Optional[str] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("hello", "ping", "events", "failed", "released", "status", "completion")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    ping: WorkerPing
    events: LoopEvents
    failed: LoopFailed
    released: LoopReleased
    status: LoopStatus
    completion: CompletionResult
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., ping: _Optional[_Union[WorkerPing, _Mapping]] = ..., events: _Optional[_Union[LoopEvents, _Mapping]] = ..., failed: _Optional[_Union[LoopFailed, _Mapping]] = ..., released: _Optional[_Union[LoopReleased, _Mapping]] = ..., status: _Optional[_Union[LoopStatus, _Mapping]] = ..., completion: _Optional[_Union[CompletionResult, _Mapping]] = ...) -> None: ...

class WorkerHello(_message.Message):
    __slots__ = ("worker_id", "agent_kinds", "capacity")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_KINDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    agent_kinds: _containers.RepeatedScalarFieldContainer[str]
    capacity: int
    def __init__(self, worker_id: _Optional[str] = ..., agent_kinds: _Optional[_Iterable[str]] = ..., capacity: _Optional[int] = ...) -> None: ...

class WorkerPing(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoopEvents(_message.Message):
    __slots__ = ("conversation_id", "assignment", "events")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    events: _containers.RepeatedCompositeFieldContainer[WorkerEvent]
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ..., events: _Optional[_Iterable[_Union[WorkerEvent, _Mapping]]] = ...) -> None: ...

class LoopFailed(_message.Message):
    __slots__ = ("conversation_id", "assignment", "message")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    message: str
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LoopStatus(_message.Message):
    __slots__ = ("conversation_id", "assignment", "status")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    status: _struct_pb2.Struct
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ..., status: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class LoopReleased(_message.Message):
    __slots__ = ("conversation_id", "assignment")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("welcome", "assign", "history", "deliver", "stop", "completion")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DELIVER_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    welcome: WorkerWelcome
    assign: AssignLoop
    history: LoopHistory
    deliver: DeliverUserEvent
    stop: StopLoop
    completion: CompletionRequest
    def __init__(self, welcome: _Optional[_Union[WorkerWelcome, _Mapping]] = ..., assign: _Optional[_Union[AssignLoop, _Mapping]] = ..., history: _Optional[_Union[LoopHistory, _Mapping]] = ..., deliver: _Optional[_Union[DeliverUserEvent, _Mapping]] = ..., stop: _Optional[_Union[StopLoop, _Mapping]] = ..., completion: _Optional[_Union[CompletionRequest, _Mapping]] = ...) -> None: ...

class WorkerWelcome(_message.Message):
    __slots__ = ("worker_id", "ping_interval", "silence_timeout", "max_event_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SILENCE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    ping_interval: _duration_pb2.Duration
    silence_timeout: _duration_pb2.Duration
    max_event_bytes: int
    def __init__(self, worker_id: _Optional[str] = ..., ping_interval: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., silence_timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., max_event_bytes: _Optional[int] = ...) -> None: ...

class AssignLoop(_message.Message):
    __slots__ = ("conversation_id", "assignment", "agent_kind", "user_id", "settings", "next_event_id", "initial_user_message", "replay_events")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_KIND_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    NEXT_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    INITIAL_USER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_EVENTS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    agent_kind: str
    user_id: str
    settings: _struct_pb2.Struct
    next_event_id: int
    initial_user_message: _struct_pb2.Struct
    replay_events: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ..., agent_kind: _Optional[str] = ..., user_id: _Optional[str] = ..., settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., next_event_id: _Optional[int] = ..., initial_user_message: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., replay_events: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ...) -> None: ...

class LoopHistory(_message.Message):
    __slots__ = ("conversation_id", "assignment", "events")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    events: _containers.RepeatedCompositeFieldContainer[_conversation_service_pb2.Event]
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ..., events: _Optional[_Iterable[_Union[_conversation_service_pb2.Event, _Mapping]]] = ...) -> None: ...

class DeliverUserEvent(_message.Message):
    __slots__ = ("conversation_id", "assignment", "delivery_id", "payload", "trace_parent")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TRACE_PARENT_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    delivery_id: str
    payload: _struct_pb2.Struct
    trace_parent: str
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ..., delivery_id: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., trace_parent: _Optional[str] = ...) -> None: ...

class StopLoop(_message.Message):
    __slots__ = ("conversation_id", "assignment")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ...) -> None: ...

class CompletionRequest(_message.Message):
    __slots__ = ("conversation_id", "assignment", "request_id", "service_id", "llm_config", "messages")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    LLM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    request_id: str
    service_id: str
    llm_config: _struct_pb2.Struct
    messages: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ..., request_id: _Optional[str] = ..., service_id: _Optional[str] = ..., llm_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ...) -> None: ...

class CompletionResult(_message.Message):
    __slots__ = ("conversation_id", "assignment", "request_id", "content", "error")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    assignment: int
    request_id: str
    content: str
    error: str
    def __init__(self, conversation_id: _Optional[str] = ..., assignment: _Optional[int] = ..., request_id: _Optional[str] = ..., content: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
