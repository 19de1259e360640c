-- Appending to the audit log inside the database: one call locks the head, reads the
-- frontier, writes the entries and the Merkle nodes they complete (RFC 6962: a node is
-- SHA-256(0x01 || left || right)) and the new size. Replicas queue on the head row, so it is
-- held for this call and the COMMIT only, never across round trips to a gateway.
-- The arrays are parallel, one element per entry, in log order; returns the first seq.
CREATE FUNCTION c2c_audit_append(
    p_entry BYTEA[],
    p_leaf_hash BYTEA[],
    p_at TIMESTAMPTZ[],
    p_event TEXT[],
    p_message_id TEXT[],
    p_sender TEXT[],
    p_recipient TEXT[],
    p_message_type TEXT[],
    p_outcome TEXT[],
    p_correlation_id TEXT[]
) RETURNS BIGINT
LANGUAGE plpgsql
AS $$
DECLARE
    v_first BIGINT;
    v_count INTEGER := coalesce(array_length(p_leaf_hash, 1), 0);
    -- v_border[level + 1]: the hash of the last complete subtree at that level
    v_border BYTEA[] := '{}';
    v_level INTEGER;
    v_idx BIGINT;
    v_hash BYTEA;
    v_node_level SMALLINT[] := '{}';
    v_node_idx BIGINT[] := '{}';
    v_node_hash BYTEA[] := '{}';
    v_row RECORD;
BEGIN
    SELECT size INTO STRICT v_first FROM audit_head WHERE id = 1 FOR UPDATE;
    -- the frontier of the current size: for every bit b of it, the subtree (b, (size >> b) - 1)
    FOR v_row IN
        SELECT n.level, n.hash
        FROM generate_series(0, 62) AS b
        JOIN audit_nodes AS n ON n.level = b AND n.idx = (v_first >> b) - 1
        WHERE (v_first >> b) & 1 = 1
    LOOP
        v_border[v_row.level + 1] := v_row.hash;
    END LOOP;
    FOR v_i IN 1 .. v_count LOOP
        v_idx := v_first + v_i - 1;
        v_level := 0;
        v_hash := p_leaf_hash[v_i];
        v_node_level := v_node_level || 0::SMALLINT;
        v_node_idx := v_node_idx || v_idx;
        v_node_hash := v_node_hash || v_hash;
        -- a right child completes its parent; climb while that keeps happening
        WHILE v_idx % 2 = 1 LOOP
            IF v_border[v_level + 1] IS NULL THEN
                RAISE EXCEPTION 'audit node (%, %) missing at size %', v_level, v_idx - 1, v_first;
            END IF;
            v_hash := sha256('\x01'::BYTEA || v_border[v_level + 1] || v_hash);
            v_level := v_level + 1;
            v_idx := v_idx / 2;
            v_node_level := v_node_level || v_level::SMALLINT;
            v_node_idx := v_node_idx || v_idx;
            v_node_hash := v_node_hash || v_hash;
        END LOOP;
        v_border[v_level + 1] := v_hash;
    END LOOP;
    INSERT INTO audit_entries (seq, entry, leaf_hash, at, event, message_id, sender, recipient,
        message_type, outcome, correlation_id)
    SELECT v_first + u.ord - 1, u.entry, u.leaf_hash, u.at, u.event, u.message_id, u.sender,
        u.recipient, u.message_type, u.outcome, u.correlation_id
    FROM unnest(p_entry, p_leaf_hash, p_at, p_event, p_message_id, p_sender, p_recipient,
        p_message_type, p_outcome, p_correlation_id)
        WITH ORDINALITY AS u(entry, leaf_hash, at, event, message_id, sender, recipient,
            message_type, outcome, correlation_id, ord);
    INSERT INTO audit_nodes (level, idx, hash)
    SELECT * FROM unnest(v_node_level, v_node_idx, v_node_hash);
    UPDATE audit_head SET size = v_first + v_count WHERE id = 1;
    RETURN v_first;
END;
$$;
