-- The audit log of mutations, and scoped tokens revoked before they expire.

CREATE TABLE audit (
    sequence bigserial PRIMARY KEY,
    time timestamptz NOT NULL,
    credential text NOT NULL,
    subject text NOT NULL,
    token_id text NOT NULL,
    method text NOT NULL,
    user_id text NOT NULL,
    conversation_id text NOT NULL,
    connection_id text NOT NULL,
    request_id text NOT NULL,
    code text NOT NULL,
    reason text NOT NULL,
    affected_token_id text NOT NULL
);
CREATE INDEX audit_by_conversation ON audit (conversation_id, sequence);

CREATE TABLE revoked_tokens (
    token_id text PRIMARY KEY,
    expire_time timestamptz NOT NULL
);
