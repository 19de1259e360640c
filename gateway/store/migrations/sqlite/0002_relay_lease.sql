-- The inbox relay claims pending rows with a lease (microseconds since the epoch), like the outbox.
ALTER TABLE inbound_messages ADD COLUMN relay_owner TEXT;
ALTER TABLE inbound_messages ADD COLUMN relay_lease_until INTEGER;
