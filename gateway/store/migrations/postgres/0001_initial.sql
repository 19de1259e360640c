CREATE TABLE inbound_messages (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_type TEXT NOT NULL,
    schema_version TEXT NOT NULL,
    correlation_id TEXT,
    in_reply_to TEXT,
    body BYTEA,
    body_digest TEXT NOT NULL,
    signature TEXT NOT NULL,
    kid TEXT NOT NULL,
    transport TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    receipt_body BYTEA NOT NULL,
    receipt_signature TEXT NOT NULL,
    relayed BOOLEAN NOT NULL DEFAULT FALSE,
    CONSTRAINT inbound_sender_message_id UNIQUE (sender, message_id)
);
CREATE INDEX inbound_pending_relay ON inbound_messages (seq) WHERE NOT relayed;
CREATE INDEX inbound_in_reply_to ON inbound_messages (in_reply_to) WHERE in_reply_to IS NOT NULL;
CREATE INDEX inbound_received_at ON inbound_messages (received_at);
CREATE INDEX inbound_correlation ON inbound_messages (correlation_id)
    WHERE correlation_id IS NOT NULL;

CREATE TABLE outbound_messages (
    message_id TEXT PRIMARY KEY,
    recipient TEXT NOT NULL,
    message_type TEXT NOT NULL,
    schema_version TEXT NOT NULL,
    correlation_id TEXT,
    in_reply_to TEXT,
    priority TEXT NOT NULL,
    priority_rank SMALLINT NOT NULL,
    body BYTEA,
    body_digest TEXT NOT NULL,
    signature TEXT NOT NULL,
    kid TEXT NOT NULL,
    transport TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_error TEXT,
    receipt_body BYTEA,
    receipt_signature TEXT,
    submitted_by TEXT,
    updated_at TIMESTAMPTZ NOT NULL,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    retried_by TEXT
);
CREATE INDEX outbound_due ON outbound_messages (priority_rank, next_attempt_at)
    WHERE state IN ('queued', 'sent');
CREATE INDEX outbound_created_at ON outbound_messages (created_at);
CREATE INDEX outbound_state ON outbound_messages (state);
CREATE INDEX outbound_correlation ON outbound_messages (correlation_id)
    WHERE correlation_id IS NOT NULL;

CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    size BIGINT NOT NULL
);
INSERT INTO audit_head (id, size) VALUES (1, 0);

CREATE TABLE audit_entries (
    seq BIGINT PRIMARY KEY,
    entry BYTEA NOT NULL,
    leaf_hash BYTEA NOT NULL,
    at TIMESTAMPTZ NOT NULL,
    event TEXT NOT NULL,
    message_id TEXT,
    sender TEXT,
    recipient TEXT,
    message_type TEXT,
    outcome TEXT,
    correlation_id TEXT
);
CREATE INDEX audit_by_message_id ON audit_entries (message_id, seq) WHERE message_id IS NOT NULL;
CREATE INDEX audit_by_at ON audit_entries (at);
CREATE INDEX audit_by_sender ON audit_entries (sender, seq) WHERE sender IS NOT NULL;
CREATE INDEX audit_by_recipient ON audit_entries (recipient, seq) WHERE recipient IS NOT NULL;
CREATE INDEX audit_by_type ON audit_entries (message_type, seq) WHERE message_type IS NOT NULL;
CREATE INDEX audit_by_outcome ON audit_entries (outcome, seq) WHERE outcome IS NOT NULL;
CREATE INDEX audit_by_event ON audit_entries (event, seq);
CREATE INDEX audit_by_correlation ON audit_entries (correlation_id, seq)
    WHERE correlation_id IS NOT NULL;

CREATE TABLE audit_nodes (
    level SMALLINT NOT NULL,
    idx BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);

CREATE TABLE audit_checkpoints (
    size BIGINT PRIMARY KEY,
    root_hash BYTEA NOT NULL,
    note TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE audit_cosignatures (
    partner TEXT NOT NULL,
    size BIGINT NOT NULL,
    root_hash BYTEA NOT NULL,
    note TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (partner, size)
);
CREATE INDEX audit_cosignatures_by_size ON audit_cosignatures (size);

CREATE TABLE audit_witnessed (
    origin TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    root_hash BYTEA NOT NULL,
    note TEXT NOT NULL
);
