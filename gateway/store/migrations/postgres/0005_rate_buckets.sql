-- Partner rate limits shared by every gateway process on this database: one token bucket per
-- partner. A process takes tokens in small batches and spends them locally, so the partner's
-- configured rate holds across replicas, whichever one its connections land on.
CREATE TABLE rate_buckets (
    partner TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    stamp TIMESTAMPTZ NOT NULL
);

-- Refill the bucket for the time since its last use (the database's clock, one for all
-- replicas), then grant up to p_want whole tokens; returns how many were granted.
CREATE FUNCTION c2c_take_tokens(
    p_partner TEXT,
    p_want DOUBLE PRECISION,
    p_rate DOUBLE PRECISION,
    p_burst DOUBLE PRECISION
) RETURNS DOUBLE PRECISION
LANGUAGE plpgsql
AS $$
DECLARE
    v_now TIMESTAMPTZ := clock_timestamp();
    v_tokens DOUBLE PRECISION;
    v_stamp TIMESTAMPTZ;
    v_granted DOUBLE PRECISION;
BEGIN
    INSERT INTO rate_buckets (partner, tokens, stamp) VALUES (p_partner, p_burst, v_now)
        ON CONFLICT (partner) DO NOTHING;
    SELECT tokens, stamp INTO v_tokens, v_stamp
        FROM rate_buckets WHERE partner = p_partner FOR UPDATE;
    v_tokens := least(
        p_burst, v_tokens + greatest(0, extract(epoch FROM v_now - v_stamp)) * p_rate
    );
    v_granted := greatest(0, least(p_want, floor(v_tokens)));
    UPDATE rate_buckets SET tokens = v_tokens - v_granted, stamp = v_now
        WHERE partner = p_partner;
    RETURN v_granted;
END
$$;
