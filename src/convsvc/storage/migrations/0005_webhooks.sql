-- The webhook outbox: endpoints, and one delivery per notification and endpoint, written in
-- the transaction of the change that caused it and sent by whichever node leases it first.
CREATE TABLE webhooks (
    webhook_id text PRIMARY KEY,
    url text NOT NULL,
    event_types text[] NOT NULL,
    secret text NOT NULL,
    description text NOT NULL,
    create_time timestamptz NOT NULL
);
CREATE TABLE webhook_deliveries (
    delivery_id text PRIMARY KEY,
    webhook_id text NOT NULL,
    type text NOT NULL,
    conversation_id text NOT NULL,
    payload text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    create_time timestamptz NOT NULL,
    next_attempt_time timestamptz,
    last_status_code integer NOT NULL DEFAULT 0,
    last_error text NOT NULL DEFAULT '',
    delivered_time timestamptz,
    lease_node text,
    lease_until timestamptz
);
CREATE INDEX webhook_deliveries_due
    ON webhook_deliveries (next_attempt_time) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_time
    ON webhook_deliveries (create_time DESC, delivery_id DESC);
