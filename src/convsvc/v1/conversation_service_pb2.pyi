from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConversationStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONVERSATION_STATUS_UNSPECIFIED: _ClassVar[ConversationStatus]
    CONVERSATION_STATUS_STARTING: _ClassVar[ConversationStatus]
    CONVERSATION_STATUS_RUNNING: _ClassVar[ConversationStatus]
    CONVERSATION_STATUS_STOPPED: _ClassVar[ConversationStatus]
    CONVERSATION_STATUS_QUEUED: _ClassVar[ConversationStatus]

class AdmissionPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADMISSION_POLICY_UNSPECIFIED: _ClassVar[AdmissionPolicy]
    ADMISSION_POLICY_EVICT_OLDEST: _ClassVar[AdmissionPolicy]
    ADMISSION_POLICY_EVICT_IDLE_ONLY: _ClassVar[AdmissionPolicy]
    ADMISSION_POLICY_REJECT: _ClassVar[AdmissionPolicy]
    ADMISSION_POLICY_QUEUE: _ClassVar[AdmissionPolicy]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_ACTION: _ClassVar[EventKind]
    EVENT_KIND_OBSERVATION: _ClassVar[EventKind]

class SecurityRisk(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECURITY_RISK_UNSPECIFIED: _ClassVar[SecurityRisk]
    SECURITY_RISK_UNKNOWN: _ClassVar[SecurityRisk]
    SECURITY_RISK_LOW: _ClassVar[SecurityRisk]
    SECURITY_RISK_MEDIUM: _ClassVar[SecurityRisk]
    SECURITY_RISK_HIGH: _ClassVar[SecurityRisk]

class BusyPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUSY_POLICY_UNSPECIFIED: _ClassVar[BusyPolicy]
    BUSY_POLICY_ENQUEUE: _ClassVar[BusyPolicy]
    BUSY_POLICY_REJECT: _ClassVar[BusyPolicy]
    BUSY_POLICY_INTERRUPT: _ClassVar[BusyPolicy]

class AgentControl(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_CONTROL_UNSPECIFIED: _ClassVar[AgentControl]
    AGENT_CONTROL_PAUSE: _ClassVar[AgentControl]
    AGENT_CONTROL_RESUME: _ClassVar[AgentControl]
    AGENT_CONTROL_INTERRUPT: _ClassVar[AgentControl]

class ApprovalDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_DECISION_UNSPECIFIED: _ClassVar[ApprovalDecision]
    APPROVAL_DECISION_APPROVE: _ClassVar[ApprovalDecision]
    APPROVAL_DECISION_REJECT: _ClassVar[ApprovalDecision]

class ConversationChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONVERSATION_CHANGE_KIND_UNSPECIFIED: _ClassVar[ConversationChangeKind]
    CONVERSATION_CHANGE_KIND_CREATED: _ClassVar[ConversationChangeKind]
    CONVERSATION_CHANGE_KIND_STATUS_CHANGED: _ClassVar[ConversationChangeKind]
    CONVERSATION_CHANGE_KIND_AGENT_STATE_CHANGED: _ClassVar[ConversationChangeKind]
    CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED: _ClassVar[ConversationChangeKind]
    CONVERSATION_CHANGE_KIND_QUEUE_POSITION_CHANGED: _ClassVar[ConversationChangeKind]
    CONVERSATION_CHANGE_KIND_CLOSED: _ClassVar[ConversationChangeKind]
    CONVERSATION_CHANGE_KIND_PENDING_ACTION_CHANGED: _ClassVar[ConversationChangeKind]
    CONVERSATION_CHANGE_KIND_UPDATED: _ClassVar[ConversationChangeKind]

class Permission(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERMISSION_UNSPECIFIED: _ClassVar[Permission]
    PERMISSION_READ: _ClassVar[Permission]
    PERMISSION_WRITE: _ClassVar[Permission]
    PERMISSION_ADMIN: _ClassVar[Permission]

class WebhookEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEBHOOK_EVENT_TYPE_UNSPECIFIED: _ClassVar[WebhookEventType]
    WEBHOOK_EVENT_TYPE_FINISHED: _ClassVar[WebhookEventType]
    WEBHOOK_EVENT_TYPE_ERROR: _ClassVar[WebhookEventType]
    WEBHOOK_EVENT_TYPE_AWAITING_USER: _ClassVar[WebhookEventType]
    WEBHOOK_EVENT_TYPE_AWAITING_CONFIRMATION: _ClassVar[WebhookEventType]
    WEBHOOK_EVENT_TYPE_CLOSED: _ClassVar[WebhookEventType]
    WEBHOOK_EVENT_TYPE_EVICTED: _ClassVar[WebhookEventType]

class WebhookDeliveryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEBHOOK_DELIVERY_STATE_UNSPECIFIED: _ClassVar[WebhookDeliveryState]
    WEBHOOK_DELIVERY_STATE_PENDING: _ClassVar[WebhookDeliveryState]
    WEBHOOK_DELIVERY_STATE_DELIVERED: _ClassVar[WebhookDeliveryState]
    WEBHOOK_DELIVERY_STATE_DEAD: _ClassVar[WebhookDeliveryState]
CONVERSATION_STATUS_UNSPECIFIED: ConversationStatus
CONVERSATION_STATUS_STARTING: ConversationStatus
CONVERSATION_STATUS_RUNNING: ConversationStatus
CONVERSATION_STATUS_STOPPED: ConversationStatus
CONVERSATION_STATUS_QUEUED: ConversationStatus
ADMISSION_POLICY_UNSPECIFIED: AdmissionPolicy
ADMISSION_POLICY_EVICT_OLDEST: AdmissionPolicy
ADMISSION_POLICY_EVICT_IDLE_ONLY: AdmissionPolicy
ADMISSION_POLICY_REJECT: AdmissionPolicy
ADMISSION_POLICY_QUEUE: AdmissionPolicy
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_ACTION: EventKind
EVENT_KIND_OBSERVATION: EventKind
SECURITY_RISK_UNSPECIFIED: SecurityRisk
SECURITY_RISK_UNKNOWN: SecurityRisk
SECURITY_RISK_LOW: SecurityRisk
SECURITY_RISK_MEDIUM: SecurityRisk
SECURITY_RISK_HIGH: SecurityRisk
BUSY_POLICY_UNSPECIFIED: BusyPolicy
BUSY_POLICY_ENQUEUE: BusyPolicy
BUSY_POLICY_REJECT: BusyPolicy
BUSY_POLICY_INTERRUPT: BusyPolicy
AGENT_CONTROL_UNSPECIFIED: AgentControl
AGENT_CONTROL_PAUSE: AgentControl
AGENT_CONTROL_RESUME: AgentControl
AGENT_CONTROL_INTERRUPT: AgentControl
APPROVAL_DECISION_UNSPECIFIED: ApprovalDecision
APPROVAL_DECISION_APPROVE: ApprovalDecision
APPROVAL_DECISION_REJECT: ApprovalDecision
CONVERSATION_CHANGE_KIND_UNSPECIFIED: ConversationChangeKind
CONVERSATION_CHANGE_KIND_CREATED: ConversationChangeKind
CONVERSATION_CHANGE_KIND_STATUS_CHANGED: ConversationChangeKind
CONVERSATION_CHANGE_KIND_AGENT_STATE_CHANGED: ConversationChangeKind
CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED: ConversationChangeKind
CONVERSATION_CHANGE_KIND_QUEUE_POSITION_CHANGED: ConversationChangeKind
CONVERSATION_CHANGE_KIND_CLOSED: ConversationChangeKind
CONVERSATION_CHANGE_KIND_PENDING_ACTION_CHANGED: ConversationChangeKind
CONVERSATION_CHANGE_KIND_UPDATED: ConversationChangeKind
PERMISSION_UNSPECIFIED: Permission
PERMISSION_READ: Permission
PERMISSION_WRITE: Permission
PERMISSION_ADMIN: Permission
WEBHOOK_EVENT_TYPE_UNSPECIFIED: WebhookEventType
WEBHOOK_EVENT_TYPE_FINISHED: WebhookEventType
WEBHOOK_EVENT_TYPE_ERROR: WebhookEventType
WEBHOOK_EVENT_TYPE_AWAITING_USER: WebhookEventType
WEBHOOK_EVENT_TYPE_AWAITING_CONFIRMATION: WebhookEventType
WEBHOOK_EVENT_TYPE_CLOSED: WebhookEventType
WEBHOOK_EVENT_TYPE_EVICTED: WebhookEventType
WEBHOOK_DELIVERY_STATE_UNSPECIFIED: WebhookDeliveryState
WEBHOOK_DELIVERY_STATE_PENDING: WebhookDeliveryState
WEBHOOK_DELIVERY_STATE_DELIVERED: WebhookDeliveryState
WEBHOOK_DELIVERY_STATE_DEAD: WebhookDeliveryState

class Conversation(_message.Message):
    __slots__ = ("conversation_id", "user_id", "status", "agent", "agent_state", "latest_event_id", "create_time", "last_active_time", "connection_count", "queue_position", "owner_address", "pending_action", "labels", "title")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATE_FIELD_NUMBER: _ClassVar[int]
    LATEST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    OWNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PENDING_ACTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    user_id: str
    status: ConversationStatus
    agent: str
    agent_state: str
    latest_event_id: int
    create_time: _timestamp_pb2.Timestamp
    last_active_time: _timestamp_pb2.Timestamp
    connection_count: int
    queue_position: int
    owner_address: str
    pending_action: PendingAction
    labels: _containers.ScalarMap[str, str]
    title: str
    def __init__(self, conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., status: _Optional[_Union[ConversationStatus, str]] = ..., agent: _Optional[str] = ..., agent_state: _Optional[str] = ..., latest_event_id: _Optional[int] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_active_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., connection_count: _Optional[int] = ..., queue_position: _Optional[int] = ..., owner_address: _Optional[str] = ..., pending_action: _Optional[_Union[PendingAction, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., title: _Optional[str] = ...) -> None: ...

class PendingAction(_message.Message):
    __slots__ = ("event_id", "action", "content", "security_risk", "thought")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SECURITY_RISK_FIELD_NUMBER: _ClassVar[int]
    THOUGHT_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    action: str
    content: str
    security_risk: SecurityRisk
    thought: str
    def __init__(self, event_id: _Optional[int] = ..., action: _Optional[str] = ..., content: _Optional[str] = ..., security_risk: _Optional[_Union[SecurityRisk, str]] = ..., thought: _Optional[str] = ...) -> None: ...

class Connection(_message.Message):
    __slots__ = ("connection_id", "conversation_id", "user_id", "client_instance_id")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    conversation_id: str
    user_id: str
    client_instance_id: str
    def __init__(self, connection_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., client_instance_id: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("conversation_id", "id", "timestamp", "source", "kind", "name", "payload", "trace_parent")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TRACE_PARENT_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    id: int
    timestamp: _timestamp_pb2.Timestamp
    source: str
    kind: EventKind
    name: str
    payload: _struct_pb2.Struct
    trace_parent: str
    def __init__(self, conversation_id: _Optional[str] = ..., id: _Optional[int] = ..., timestamp: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., name: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., trace_parent: _Optional[str] = ...) -> None: ...

class StartConversationRequest(_message.Message):
    __slots__ = ("conversation_id", "user_id", "agent", "settings", "initial_user_message", "replay_events", "request_id", "admission_policy", "labels", "title")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_USER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_EVENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    user_id: str
    agent: str
    settings: _struct_pb2.Struct
    initial_user_message: _struct_pb2.Struct
    replay_events: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    request_id: str
    admission_policy: AdmissionPolicy
    labels: _containers.ScalarMap[str, str]
    title: str
    def __init__(self, conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., agent: _Optional[str] = ..., settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., initial_user_message: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., replay_events: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., request_id: _Optional[str] = ..., admission_policy: _Optional[_Union[AdmissionPolicy, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., title: _Optional[str] = ...) -> None: ...

class StartConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class ForkConversationRequest(_message.Message):
    __slots__ = ("source_conversation_id", "at_event_id", "conversation_id", "user_id", "settings", "labels", "title", "request_id", "admission_policy")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SOURCE_CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    AT_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    source_conversation_id: str
    at_event_id: int
    conversation_id: str
    user_id: str
    settings: _struct_pb2.Struct
    labels: _containers.ScalarMap[str, str]
    title: str
    request_id: str
    admission_policy: AdmissionPolicy
    def __init__(self, source_conversation_id: _Optional[str] = ..., at_event_id: _Optional[int] = ..., conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., title: _Optional[str] = ..., request_id: _Optional[str] = ..., admission_policy: _Optional[_Union[AdmissionPolicy, str]] = ...) -> None: ...

class ForkConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class JoinConversationRequest(_message.Message):
    __slots__ = ("conversation_id", "connection_id", "user_id", "settings", "client_instance_id", "request_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    connection_id: str
    user_id: str
    settings: _struct_pb2.Struct
    client_instance_id: str
    request_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., connection_id: _Optional[str] = ..., user_id: _Optional[str] = ..., settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., client_instance_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class JoinConversationResponse(_message.Message):
    __slots__ = ("conversation", "connection")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    connection: Connection
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ..., connection: _Optional[_Union[Connection, _Mapping]] = ...) -> None: ...

class SendEventRequest(_message.Message):
    __slots__ = ("connection_id", "conversation_id", "user_id", "event", "request_id", "busy_policy")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUSY_POLICY_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    conversation_id: str
    user_id: str
    event: _struct_pb2.Struct
    request_id: str
    busy_policy: BusyPolicy
    def __init__(self, connection_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., event: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ..., busy_policy: _Optional[_Union[BusyPolicy, str]] = ...) -> None: ...

class ControlAgentRequest(_message.Message):
    __slots__ = ("conversation_id", "control", "user_id", "request_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    control: AgentControl
    user_id: str
    request_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., control: _Optional[_Union[AgentControl, str]] = ..., user_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ControlAgentResponse(_message.Message):
    __slots__ = ("conversation_id", "event_id", "agent_state")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATE_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    event_id: int
    agent_state: str
    def __init__(self, conversation_id: _Optional[str] = ..., event_id: _Optional[int] = ..., agent_state: _Optional[str] = ...) -> None: ...

class ConfirmActionRequest(_message.Message):
    __slots__ = ("conversation_id", "action_id", "decision", "user_id", "request_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    action_id: int
    decision: ApprovalDecision
    user_id: str
    request_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., action_id: _Optional[int] = ..., decision: _Optional[_Union[ApprovalDecision, str]] = ..., user_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ConfirmActionResponse(_message.Message):
    __slots__ = ("conversation_id", "event_id", "agent_state")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATE_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    event_id: int
    agent_state: str
    def __init__(self, conversation_id: _Optional[str] = ..., event_id: _Optional[int] = ..., agent_state: _Optional[str] = ...) -> None: ...

class SendEventResponse(_message.Message):
    __slots__ = ("conversation_id", "event_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    event_id: int
    def __init__(self, conversation_id: _Optional[str] = ..., event_id: _Optional[int] = ...) -> None: ...

class DisconnectConnectionRequest(_message.Message):
    __slots__ = ("connection_id", "user_id", "request_id")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    user_id: str
    request_id: str
    def __init__(self, connection_id: _Optional[str] = ..., user_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DisconnectConnectionResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: bool = ...) -> None: ...

class CloseConversationRequest(_message.Message):
    __slots__ = ("conversation_id", "user_id", "request_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    user_id: str
    request_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CloseConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class GetConversationRequest(_message.Message):
    __slots__ = ("conversation_id", "user_id")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    user_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class GetConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class ListConversationsRequest(_message.Message):
    __slots__ = ("user_id", "conversation_ids", "page_size", "page_token", "agent_states")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_IDS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_ids: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    agent_states: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., conversation_ids: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., agent_states: _Optional[_Iterable[str]] = ...) -> None: ...

class ListConversationsResponse(_message.Message):
    __slots__ = ("conversations", "next_page_token")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[Conversation]
    next_page_token: str
    def __init__(self, conversations: _Optional[_Iterable[_Union[Conversation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SearchConversationsRequest(_message.Message):
    __slots__ = ("user_id", "conversation_ids", "statuses", "agent_states", "agents", "labels", "title_contains", "create_time_after", "create_time_before", "last_active_time_after", "last_active_time_before", "page_size", "page_token")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_IDS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATES_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TITLE_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_TIME_AFTER_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_TIME_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_ids: _containers.RepeatedScalarFieldContainer[str]
    statuses: _containers.RepeatedScalarFieldContainer[ConversationStatus]
    agent_states: _containers.RepeatedScalarFieldContainer[str]
    agents: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    title_contains: str
    create_time_after: _timestamp_pb2.Timestamp
    create_time_before: _timestamp_pb2.Timestamp
    last_active_time_after: _timestamp_pb2.Timestamp
    last_active_time_before: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_ids: _Optional[_Iterable[str]] = ..., statuses: _Optional[_Iterable[_Union[ConversationStatus, str]]] = ..., agent_states: _Optional[_Iterable[str]] = ..., agents: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., title_contains: _Optional[str] = ..., create_time_after: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., create_time_before: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_active_time_after: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_active_time_before: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SearchConversationsResponse(_message.Message):
    __slots__ = ("conversations", "next_page_token")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[Conversation]
    next_page_token: str
    def __init__(self, conversations: _Optional[_Iterable[_Union[Conversation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateConversationRequest(_message.Message):
    __slots__ = ("conversation_id", "labels", "title", "update_mask", "user_id", "request_id")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    labels: _containers.ScalarMap[str, str]
    title: str
    update_mask: _field_mask_pb2.FieldMask
    user_id: str
    request_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., title: _Optional[str] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., user_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ...) -> None: ...

class ListConnectionsRequest(_message.Message):
    __slots__ = ("user_id", "conversation_ids", "page_size", "page_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_IDS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_ids: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_ids: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListConnectionsResponse(_message.Message):
    __slots__ = ("connections", "next_page_token")
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    connections: _containers.RepeatedCompositeFieldContainer[Connection]
    next_page_token: str
    def __init__(self, connections: _Optional[_Iterable[_Union[Connection, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SearchEventsRequest(_message.Message):
    __slots__ = ("conversation_id", "user_id", "start_id", "end_id", "reverse", "page_size", "page_token")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    START_ID_FIELD_NUMBER: _ClassVar[int]
    END_ID_FIELD_NUMBER: _ClassVar[int]
    REVERSE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    user_id: str
    start_id: int
    end_id: int
    reverse: bool
    page_size: int
    page_token: str
    def __init__(self, conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., start_id: _Optional[int] = ..., end_id: _Optional[int] = ..., reverse: bool = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SearchEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("conversation_id", "user_id", "start_id", "max_batch_size")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    START_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    user_id: str
    start_id: int
    max_batch_size: int
    def __init__(self, conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., start_id: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class StreamEventsResponse(_message.Message):
    __slots__ = ("events", "status_update")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_UPDATE_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    status_update: _struct_pb2.Struct
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., status_update: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_instance_id",)
    CLIENT_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    client_instance_id: str
    def __init__(self, client_instance_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("connection_count", "ttl_seconds")
    CONNECTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    connection_count: int
    ttl_seconds: float
    def __init__(self, connection_count: _Optional[int] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class CompleteWithAgentLlmRequest(_message.Message):
    __slots__ = ("conversation_id", "user_id", "service_id", "llm_config", "messages")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    LLM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    user_id: str
    service_id: str
    llm_config: _struct_pb2.Struct
    messages: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    def __init__(self, conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., service_id: _Optional[str] = ..., llm_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ...) -> None: ...

class CompleteWithAgentLlmResponse(_message.Message):
    __slots__ = ("content",)
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    content: str
    def __init__(self, content: _Optional[str] = ...) -> None: ...

class WatchedConversation(_message.Message):
    __slots__ = ("conversation", "connection_ids")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_IDS_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    connection_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ..., connection_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ConversationChange(_message.Message):
    __slots__ = ("kind", "watched", "change_time")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WATCHED_FIELD_NUMBER: _ClassVar[int]
    CHANGE_TIME_FIELD_NUMBER: _ClassVar[int]
    kind: ConversationChangeKind
    watched: WatchedConversation
    change_time: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[ConversationChangeKind, str]] = ..., watched: _Optional[_Union[WatchedConversation, _Mapping]] = ..., change_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchConversationsRequest(_message.Message):
    __slots__ = ("user_id", "conversation_ids", "resume_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_IDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_ids: _containers.RepeatedScalarFieldContainer[str]
    resume_token: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_ids: _Optional[_Iterable[str]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class WatchConversationsResponse(_message.Message):
    __slots__ = ("snapshot", "snapshot_complete", "changes", "resume_token")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    snapshot: _containers.RepeatedCompositeFieldContainer[WatchedConversation]
    snapshot_complete: bool
    changes: _containers.RepeatedCompositeFieldContainer[ConversationChange]
    resume_token: str
    def __init__(self, snapshot: _Optional[_Iterable[_Union[WatchedConversation, _Mapping]]] = ..., snapshot_complete: bool = ..., changes: _Optional[_Iterable[_Union[ConversationChange, _Mapping]]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("open", "send")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SEND_FIELD_NUMBER: _ClassVar[int]
    open: ConnectOpen
    send: ConnectSend
    def __init__(self, open: _Optional[_Union[ConnectOpen, _Mapping]] = ..., send: _Optional[_Union[ConnectSend, _Mapping]] = ...) -> None: ...

class ConnectOpen(_message.Message):
    __slots__ = ("conversation_id", "connection_id", "user_id", "settings", "start_id", "max_batch_size")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    START_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    connection_id: str
    user_id: str
    settings: _struct_pb2.Struct
    start_id: int
    max_batch_size: int
    def __init__(self, conversation_id: _Optional[str] = ..., connection_id: _Optional[str] = ..., user_id: _Optional[str] = ..., settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., start_id: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class ConnectSend(_message.Message):
    __slots__ = ("event", "request_id", "busy_policy")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUSY_POLICY_FIELD_NUMBER: _ClassVar[int]
    event: _struct_pb2.Struct
    request_id: str
    busy_policy: BusyPolicy
    def __init__(self, event: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ..., busy_policy: _Optional[_Union[BusyPolicy, str]] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("opened", "events", "send_result")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SEND_RESULT_FIELD_NUMBER: _ClassVar[int]
    opened: ConnectOpened
    events: StreamEventsResponse
    send_result: ConnectSendResult
    def __init__(self, opened: _Optional[_Union[ConnectOpened, _Mapping]] = ..., events: _Optional[_Union[StreamEventsResponse, _Mapping]] = ..., send_result: _Optional[_Union[ConnectSendResult, _Mapping]] = ...) -> None: ...

class ConnectOpened(_message.Message):
    __slots__ = ("conversation", "connection")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    connection: Connection
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ..., connection: _Optional[_Union[Connection, _Mapping]] = ...) -> None: ...

class ConnectSendResult(_message.Message):
    __slots__ = ("request_id", "event_id", "failure")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    event_id: int
    failure: ConnectSendFailure
    def __init__(self, request_id: _Optional[str] = ..., event_id: _Optional[int] = ..., failure: _Optional[_Union[ConnectSendFailure, _Mapping]] = ...) -> None: ...

class ConnectSendFailure(_message.Message):
    __slots__ = ("code", "reason", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MintTokenRequest(_message.Message):
    __slots__ = ("user_id", "conversation_ids", "permissions", "ttl_seconds")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_IDS_FIELD_NUMBER: _ClassVar[int]
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_ids: _containers.RepeatedScalarFieldContainer[str]
    permissions: _containers.RepeatedScalarFieldContainer[Permission]
    ttl_seconds: int
    def __init__(self, user_id: _Optional[str] = ..., conversation_ids: _Optional[_Iterable[str]] = ..., permissions: _Optional[_Iterable[_Union[Permission, str]]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class MintTokenResponse(_message.Message):
    __slots__ = ("token", "token_id", "expire_time")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ..., expire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token_id", "request_id")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    request_id: str
    def __init__(self, token_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("sequence", "time", "credential", "subject", "token_id", "method", "user_id", "conversation_id", "connection_id", "request_id", "code", "reason", "affected_token_id")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AFFECTED_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    credential: str
    subject: str
    token_id: str
    method: str
    user_id: str
    conversation_id: str
    connection_id: str
    request_id: str
    code: str
    reason: str
    affected_token_id: str
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., credential: _Optional[str] = ..., subject: _Optional[str] = ..., token_id: _Optional[str] = ..., method: _Optional[str] = ..., user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., connection_id: _Optional[str] = ..., request_id: _Optional[str] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ..., affected_token_id: _Optional[str] = ...) -> None: ...

class ListAuditEntriesRequest(_message.Message):
    __slots__ = ("conversation_id", "user_id", "page_size", "page_token")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    user_id: str
    page_size: int
    page_token: str
    def __init__(self, conversation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Webhook(_message.Message):
    __slots__ = ("webhook_id", "url", "event_types", "secret", "description", "create_time")
    WEBHOOK_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    webhook_id: str
    url: str
    event_types: _containers.RepeatedScalarFieldContainer[WebhookEventType]
    secret: str
    description: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, webhook_id: _Optional[str] = ..., url: _Optional[str] = ..., event_types: _Optional[_Iterable[_Union[WebhookEventType, str]]] = ..., secret: _Optional[str] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateWebhookRequest(_message.Message):
    __slots__ = ("url", "event_types", "secret", "description", "webhook_id")
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_ID_FIELD_NUMBER: _ClassVar[int]
    url: str
    event_types: _containers.RepeatedScalarFieldContainer[WebhookEventType]
    secret: str
    description: str
    webhook_id: str
    def __init__(self, url: _Optional[str] = ..., event_types: _Optional[_Iterable[_Union[WebhookEventType, str]]] = ..., secret: _Optional[str] = ..., description: _Optional[str] = ..., webhook_id: _Optional[str] = ...) -> None: ...

class CreateWebhookResponse(_message.Message):
    __slots__ = ("webhook",)
    WEBHOOK_FIELD_NUMBER: _ClassVar[int]
    webhook: Webhook
    def __init__(self, webhook: _Optional[_Union[Webhook, _Mapping]] = ...) -> None: ...

class ListWebhooksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWebhooksResponse(_message.Message):
    __slots__ = ("webhooks",)
    WEBHOOKS_FIELD_NUMBER: _ClassVar[int]
    webhooks: _containers.RepeatedCompositeFieldContainer[Webhook]
    def __init__(self, webhooks: _Optional[_Iterable[_Union[Webhook, _Mapping]]] = ...) -> None: ...

class DeleteWebhookRequest(_message.Message):
    __slots__ = ("webhook_id",)
    WEBHOOK_ID_FIELD_NUMBER: _ClassVar[int]
    webhook_id: str
    def __init__(self, webhook_id: _Optional[str] = ...) -> None: ...

class DeleteWebhookResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: bool = ...) -> None: ...

class WebhookDelivery(_message.Message):
    __slots__ = ("delivery_id", "webhook_id", "type", "conversation_id", "payload", "state", "attempts", "create_time", "next_attempt_time", "last_status_code", "last_error", "delivered_time")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_TIME_FIELD_NUMBER: _ClassVar[int]
    delivery_id: str
    webhook_id: str
    type: WebhookEventType
    conversation_id: str
    payload: _struct_pb2.Struct
    state: WebhookDeliveryState
    attempts: int
    create_time: _timestamp_pb2.Timestamp
    next_attempt_time: _timestamp_pb2.Timestamp
    last_status_code: int
    last_error: str
    delivered_time: _timestamp_pb2.Timestamp
    def __init__(self, delivery_id: _Optional[str] = ..., webhook_id: _Optional[str] = ..., type: _Optional[_Union[WebhookEventType, str]] = ..., conversation_id: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., state: _Optional[_Union[WebhookDeliveryState, str]] = ..., attempts: _Optional[int] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_status_code: _Optional[int] = ..., last_error: _Optional[str] = ..., delivered_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListWebhookDeliveriesRequest(_message.Message):
    __slots__ = ("webhook_id", "conversation_id", "states", "page_size", "page_token")
    WEBHOOK_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    webhook_id: str
    conversation_id: str
    states: _containers.RepeatedScalarFieldContainer[WebhookDeliveryState]
    page_size: int
    page_token: str
    def __init__(self, webhook_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., states: _Optional[_Iterable[_Union[WebhookDeliveryState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWebhookDeliveriesResponse(_message.Message):
    __slots__ = ("deliveries", "next_page_token")
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[WebhookDelivery]
    next_page_token: str
    def __init__(self, deliveries: _Optional[_Iterable[_Union[WebhookDelivery, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "nodes")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "kinds", "capacity", "load", "conversation_ids", "node_address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_IDS_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    kinds: _containers.RepeatedScalarFieldContainer[str]
    capacity: int
    load: int
    conversation_ids: _containers.RepeatedScalarFieldContainer[str]
    node_address: str
    def __init__(self, worker_id: _Optional[str] = ..., kinds: _Optional[_Iterable[str]] = ..., capacity: _Optional[int] = ..., load: _Optional[int] = ..., conversation_ids: _Optional[_Iterable[str]] = ..., node_address: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "heartbeat_time", "lease_expire_time", "conversation_count", "agent_kinds")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_COUNT_FIELD_NUMBER: _ClassVar[int]
    AGENT_KINDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    heartbeat_time: _timestamp_pb2.Timestamp
    lease_expire_time: _timestamp_pb2.Timestamp
    conversation_count: int
    agent_kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., heartbeat_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., conversation_count: _Optional[int] = ..., agent_kinds: _Optional[_Iterable[str]] = ...) -> None: ...
