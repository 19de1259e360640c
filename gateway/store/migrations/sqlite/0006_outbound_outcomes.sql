-- Outcomes of our outbound messages to publish on c2c.outcomes (transactional outbox,
-- gateway/store/outcomes.py): a row is written in the transaction that gives a message a
-- final state, and deleted once the bus confirmed it. ``outcomes`` counts a message's final
-- states, which numbers its events (``<message_id>/<state>/<n>``).
-- Messages already final when this runs get no row: their outcome is history, not news, and
-- publishing every one of them at the upgrade would flood the bus. A later final state of
-- theirs (after an operator's retry, a late receipt) is published as any other.
ALTER TABLE outbound_messages ADD COLUMN outcomes INTEGER NOT NULL DEFAULT 0;
CREATE TABLE outbound_outcomes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_type TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    body BLOB NOT NULL,
    at INTEGER NOT NULL,
    relay_owner TEXT,
    relay_lease_until INTEGER
);
