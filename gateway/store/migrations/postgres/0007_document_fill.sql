-- Inbox rows stored before 0006 have no document columns. Each open of the store fills them
-- from the rows' stored bodies (gateway/documents.py: stored_document_columns, the rules of
-- receipt), a batch at a time, each committed at once: a crash midway keeps the batches
-- done, the next open does the rest. This index finds the rows still to fill without
-- reading the whole inbox at each open: every row the gateway stores now has a created_at,
-- so once filled it holds only rows an older gateway still writes (during a rolling
-- upgrade) and bodies that do not parse. A row whose body retention purged has nothing to
-- read from: it keeps NULL, in no document.
CREATE INDEX inbound_document_fill ON inbound_messages (seq)
    WHERE created_at IS NULL AND body IS NOT NULL;
