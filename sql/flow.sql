-- Flow control: the claims of queues with settings (configure_queue):
--
--   paused               no claims at all
--   concurrency          at most this many running steps in the queue
--   rate_limit per       at most rate_limit claims in any window of
--     rate_period        rate_period, over every worker and connection
--   concurrency_key,     at most per_key_concurrency running steps per value
--     per_key_concurrency  of the key (a JSON path into the run's input)
--
-- No hot row: a rate limit's window is kept in shared memory (src/rate.rs)
-- and taken from under a lock held for microseconds, never to the end of a
-- transaction; a per-key limit locks only its key (a claim that finds a key
-- being admitted by another claim passes over it to the next key); the
-- running steps of a key are a probe of steps_flow. Only `concurrency`
-- counts a whole queue, under its advisory lock, as before.
--
-- Steps of such queues are never handed off by _complete: every one is
-- claimed here, and counted.

-- Lease up to `want` ready steps of `queues`, at least one of which has
-- settings. Queues without a per-key limit are claimed together in the
-- claim's order (_claim_one, _claim_many); those with one after, each in turn.
CREATE FUNCTION _claim_flow(worker text, queues text[], want integer, lease interval) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    at timestamptz := clock_timestamp();
    q record;
    slots integer;
    plain_names text[] := '{}';
    plain_slots integer[] := '{}';
    keyed_names text[] := '{}';
    keyed_paths jsonpath[] := '{}';
    keyed_limits integer[] := '{}';
    keyed_slots integer[] := '{}';
    rated_names text[] := '{}';
    rated_periods bigint[] := '{}';
    rated_taken integer[] := '{}';
    leased bigint[] := '{}';
BEGIN
    FOR q IN
        SELECT n.name, c.concurrency, coalesce(c.paused, false) AS paused, c.rate_limit, c.rate_period,
               c.concurrency_key, c.per_key_concurrency
          FROM (SELECT DISTINCT unnest(queues) AS name) n
          LEFT JOIN baton.queues c ON c.name = n.name
         WHERE n.name IS NOT NULL
         ORDER BY n.name  -- the queues' advisory locks, in one order
    LOOP
        CONTINUE WHEN q.paused;
        slots := want;
        IF q.concurrency IS NOT NULL THEN
            -- counted under the queue's lock, held to the end of the
            -- transaction, so that two claims cannot both take its last slot
            PERFORM pg_advisory_xact_lock(1651797602, hashtext(q.name));
            slots := least(slots, q.concurrency - (SELECT count(*) FROM baton.steps s
                                                    WHERE s.status = 'running' AND s.queue = q.name));
        END IF;
        IF slots > 0 AND q.rate_limit IS NOT NULL THEN
            rated_names := rated_names || q.name;
            rated_periods := rated_periods || (extract(epoch FROM q.rate_period) * 1000000)::bigint;
            slots := baton._rate_take(q.name, q.rate_limit, rated_periods[cardinality(rated_periods)], slots, at);
            rated_taken := rated_taken || slots;
        END IF;
        CONTINUE WHEN slots <= 0;
        IF q.per_key_concurrency IS NOT NULL THEN
            keyed_names := keyed_names || q.name;
            keyed_paths := keyed_paths || q.concurrency_key;
            keyed_limits := keyed_limits || q.per_key_concurrency;
            keyed_slots := keyed_slots || slots;
        ELSE
            plain_names := plain_names || q.name;
            plain_slots := plain_slots || slots;
        END IF;
    END LOOP;

    IF cardinality(plain_names) = 1 THEN
        leased := coalesce(baton._claim_one(worker, plain_names[1], least(plain_slots[1], want), lease), '{}');
    ELSIF cardinality(plain_names) > 1 THEN
        leased := coalesce(baton._claim_many(worker, plain_names, plain_slots, want, lease), '{}');
    END IF;
    FOR i IN 1 .. cardinality(keyed_names) LOOP
        EXIT WHEN cardinality(leased) >= want;
        leased := leased || baton._claim_keyed(worker, keyed_names[i], least(keyed_slots[i], want - cardinality(leased)),
                                               lease, keyed_paths[i], keyed_limits[i]);
    END LOOP;

    -- What a rate-limited queue did not claim (fewer steps were ready) goes
    -- back to its window.
    IF cardinality(rated_names) > 0 THEN
        PERFORM baton._rate_give_back(r.name, r.period, r.taken - coalesce(c.n, 0)::integer, at)
           FROM unnest(rated_names, rated_periods, rated_taken) AS r(name, period, taken)
           LEFT JOIN (SELECT s.queue, count(*) AS n FROM baton.steps s
                       WHERE s.step_id = ANY (leased) GROUP BY s.queue) c ON c.queue = r.name
          WHERE r.taken > coalesce(c.n, 0);
    END IF;
    RETURN leased;
END $$;

-- Lease up to `want` ready steps of a queue with a per-key limit, in the
-- claim's order, passing over the steps of keys at their limit. A key is
-- counted once per claim, under its own advisory lock (tried, never waited
-- for: a key that another claim is admitting right now is passed over), so
-- two claims can never both admit the last step of one key. A run whose
-- input has no value at the key is not limited.
CREATE FUNCTION _claim_keyed(worker text, queue text, want integer, lease interval, key_path jsonpath,
                             per_key integer) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c record;
    chosen tid[] := '{}';
    seen text[] := '{}';
    allowed integer[] := '{}';
    k integer;
    claimed_now bigint[];
BEGIN
    FOR c IN
        SELECT r.ctid,
               (SELECT jsonb_path_query_first(u.input, _claim_keyed.key_path) #>> '{}'
                  FROM baton.runs u WHERE u.id = r.run_id) AS key
          FROM baton.steps r
         WHERE r.status = 'ready' AND r.queue = _claim_keyed.queue
         ORDER BY r.priority DESC, r.run_at, r.step_id
    LOOP
        IF c.key IS NOT NULL THEN
            k := array_position(seen, c.key);
            IF k IS NULL THEN
                seen := seen || c.key;
                k := cardinality(seen);
                IF pg_try_advisory_xact_lock(1651797603, hashtext(_claim_keyed.queue || E'\n' || c.key)) THEN
                    -- a statement of its own: its snapshot, taken under the
                    -- key's lock, sees the leases of the claim that held it
                    allowed := allowed || (per_key - (SELECT count(*) FROM baton.steps s
                                                       WHERE s.status = 'running' AND s.queue = _claim_keyed.queue
                                                         AND s.flow_key = c.key))::integer;
                ELSE
                    allowed := allowed || 0;
                END IF;
            END IF;
            CONTINUE WHEN allowed[k] <= 0;
            allowed[k] := allowed[k] - 1;
        END IF;
        chosen := chosen || c.ctid;
        EXIT WHEN cardinality(chosen) >= want;
    END LOOP;
    IF cardinality(chosen) = 0 THEN
        RETURN '{}';
    END IF;

    WITH locked AS MATERIALIZED (
        -- by ctid, the status re-checked by the lock (as in _claim_many)
        SELECT l.ctid FROM baton.steps l
         WHERE l.ctid = ANY (chosen) AND l.status::text = 'ready'
           FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE baton.steps s
           SET status = 'running',
               attempt = s.attempt + 1,
               worker = _claim_keyed.worker,
               lease_token = gen_random_uuid(),
               lease_expires_at = clock_timestamp() + CASE WHEN s.timeout IS NULL THEN _claim_keyed.lease
                                                           ELSE least(_claim_keyed.lease, s.timeout) END,
               started_at = now(),
               flow_key = (SELECT jsonb_path_query_first(u.input, _claim_keyed.key_path) #>> '{}'
                             FROM baton.runs u WHERE u.id = s.run_id)
         WHERE s.ctid = ANY (ARRAY(SELECT l.ctid FROM locked l))
        RETURNING s.step_id, s.run_id
    ), started AS (
        UPDATE baton.runs r SET status = 'running', started_at = now()
         WHERE r.id = ANY (ARRAY(SELECT c.run_id FROM claimed c)) AND r.status = 'pending'
    )
    SELECT array_agg(c.step_id) INTO claimed_now FROM claimed c;
    RETURN coalesce(claimed_now, '{}');
END $$;
