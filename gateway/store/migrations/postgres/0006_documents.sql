-- Versions of one document (gateway/documents.py, RELIABILITY-SECURITY T47): the document a
-- message is a version of, the header's created_at that orders its versions (then seq), and
-- its message_function. NULL for message types without versions and for older rows.
ALTER TABLE inbound_messages
    ADD COLUMN document_ref TEXT,
    ADD COLUMN created_at TIMESTAMPTZ,
    ADD COLUMN message_function TEXT;
CREATE INDEX inbound_document ON inbound_messages (sender, message_type, document_ref)
    WHERE document_ref IS NOT NULL;
