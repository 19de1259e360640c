-- Timestamps are integer microseconds since the Unix epoch, UTC (exact and sortable).

CREATE TABLE inbound_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_type TEXT NOT NULL,
    schema_version TEXT NOT NULL,
    correlation_id TEXT,
    in_reply_to TEXT,
    body BLOB,
    body_digest TEXT NOT NULL,
    signature TEXT NOT NULL,
    kid TEXT NOT NULL,
    transport TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    receipt_body BLOB NOT NULL,
    receipt_signature TEXT NOT NULL,
    relayed INTEGER NOT NULL DEFAULT 0,
    CONSTRAINT inbound_sender_message_id UNIQUE (sender, message_id)
);
CREATE INDEX inbound_pending_relay ON inbound_messages (seq) WHERE relayed = 0;
CREATE INDEX inbound_in_reply_to ON inbound_messages (in_reply_to) WHERE in_reply_to IS NOT NULL;
CREATE INDEX inbound_received_at ON inbound_messages (received_at);
CREATE INDEX inbound_correlation ON inbound_messages (correlation_id) WHERE correlation_id IS NOT NULL;

CREATE TABLE outbound_messages (
    message_id TEXT PRIMARY KEY,
    recipient TEXT NOT NULL,
    message_type TEXT NOT NULL,
    schema_version TEXT NOT NULL,
    correlation_id TEXT,
    in_reply_to TEXT,
    priority TEXT NOT NULL,
    priority_rank INTEGER NOT NULL,
    body BLOB,
    body_digest TEXT NOT NULL,
    signature TEXT NOT NULL,
    kid TEXT NOT NULL,
    transport TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    last_error TEXT,
    receipt_body BLOB,
    receipt_signature TEXT,
    submitted_by TEXT,
    updated_at INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER,
    retried_by TEXT
) WITHOUT ROWID;
CREATE INDEX outbound_due ON outbound_messages (priority_rank, next_attempt_at)
    WHERE state IN ('queued', 'sent');
CREATE INDEX outbound_created_at ON outbound_messages (created_at);
CREATE INDEX outbound_state ON outbound_messages (state);
CREATE INDEX outbound_correlation ON outbound_messages (correlation_id)
    WHERE correlation_id IS NOT NULL;

CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    size INTEGER NOT NULL
);
INSERT INTO audit_head (id, size) VALUES (1, 0);

CREATE TABLE audit_entries (
    seq INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    at INTEGER NOT NULL,
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
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;

CREATE TABLE audit_checkpoints (
    size INTEGER PRIMARY KEY,
    root_hash BLOB NOT NULL,
    note TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE audit_cosignatures (
    partner TEXT NOT NULL,
    size INTEGER NOT NULL,
    root_hash BLOB NOT NULL,
    note TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (partner, size)
) WITHOUT ROWID;
CREATE INDEX audit_cosignatures_by_size ON audit_cosignatures (size);

CREATE TABLE audit_witnessed (
    origin TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    root_hash BLOB NOT NULL,
    note TEXT NOT NULL
) WITHOUT ROWID;
