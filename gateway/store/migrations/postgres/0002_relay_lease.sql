-- The inbox relay claims pending rows with a lease, so replicas never relay one row together.
ALTER TABLE inbound_messages
    ADD COLUMN relay_owner TEXT,
    ADD COLUMN relay_lease_until TIMESTAMPTZ;
