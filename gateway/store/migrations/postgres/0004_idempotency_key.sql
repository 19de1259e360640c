-- A submitter's Idempotency-Key (API header, AMQP message_id) is kept with the message it
-- created, with a digest of the request: a retry with the same key gets that message back.
-- Keys are scoped per submitter; a key is remembered as long as its message row is kept.
ALTER TABLE outbound_messages
    ADD COLUMN idempotency_key TEXT,
    ADD COLUMN request_digest TEXT;
CREATE UNIQUE INDEX outbound_idempotency ON outbound_messages (submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
