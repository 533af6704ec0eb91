-- The event log, conversations with their leases, and the cluster's shared state.

CREATE TABLE conversations (
    conversation_id text PRIMARY KEY,
    user_id text,
    agent text NOT NULL,
    settings text NOT NULL,
    create_time timestamptz NOT NULL,
    last_active_time timestamptz NOT NULL,
    -- Whether the conversation should be running somewhere (a dead owner's are taken over).
    running boolean NOT NULL DEFAULT false,
    -- The lease: who runs it, where to reach them, and the fencing token every append checks.
    owner_node text,
    owner_address text,
    lease_epoch bigint NOT NULL DEFAULT 0
);
-- A user's running conversations (the per-user limit, and listing) without touching others'.
CREATE INDEX conversations_running_by_user
    ON conversations (user_id, conversation_id) WHERE running;
CREATE INDEX conversations_running_by_owner
    ON conversations (owner_node) WHERE running;

CREATE TABLE events (
    conversation_id text NOT NULL,
    id bigint NOT NULL,
    encoded bytea NOT NULL,
    PRIMARY KEY (conversation_id, id)
);

CREATE TABLE requests (
    scope text NOT NULL,
    request_id text NOT NULL,
    method text NOT NULL,
    fingerprint text NOT NULL,
    result text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, request_id)
);
CREATE INDEX requests_by_age ON requests (create_time);

CREATE TABLE meta (
    key text PRIMARY KEY,
    value bytea NOT NULL
);

-- One row per live node; its heartbeat renews the leases of every conversation it owns.
CREATE TABLE nodes (
    node_id text PRIMARY KEY,
    address text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL,
    -- Agent kinds its attached workers have room for (where worker conversations start).
    agent_kinds text[] NOT NULL DEFAULT '{}'
);

-- Connections live on the conversation's owner; this directory lets any node find them.
CREATE TABLE connections (
    connection_id text PRIMARY KEY,
    conversation_id text NOT NULL,
    user_id text,
    client_instance_id text
);
CREATE INDEX connections_by_conversation ON connections (conversation_id);

-- Client instances heartbeat whichever node they reach; owners read it before expiring.
CREATE TABLE client_instances (
    client_instance_id text PRIMARY KEY,
    seen_at timestamptz NOT NULL
);
